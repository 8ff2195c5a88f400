"""Optimizers and schedulers by name: warmup values, step counts, plateau, onecycle."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import Callback, TrainingConfig, TrainingManager
from traineval.training.optim import (
    OptimizerChoice,
    ScheduleChoice,
    build_optimizer,
    build_scheduler,
    parameter_groups,
)

from conftest import make_classification, make_mlp


def _optimizer(lr: float = 1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_linear_warmup_then_constant():
    scheduler = build_scheduler(
        _optimizer(), ScheduleChoice("constant", total_steps=10, warmup_steps=4)
    )
    assert _lrs(scheduler, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_after_warmup_reaches_min_lr_at_the_end():
    scheduler = build_scheduler(
        _optimizer(), ScheduleChoice("cosine", total_steps=12, warmup_steps=2, min_lr=0.1)
    )
    lrs = _lrs(scheduler, 12)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 10)) for t in range(2, 12)]
    assert lrs[2:] == pytest.approx(expected)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_linear_after_warmup_reaches_min_lr_at_the_end():
    scheduler = build_scheduler(
        _optimizer(), ScheduleChoice("linear", total_steps=12, warmup_steps=2, min_lr=0.1)
    )
    lrs = _lrs(scheduler, 12)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:] == pytest.approx([1.0 - 0.9 * (t - 2) / 10 for t in range(2, 12)])
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="scheduler_type='linear' needs the number of optimizer"):
        build_scheduler(_optimizer(), ScheduleChoice("linear", total_steps=None))


def test_step_schedule_decays_every_step_size_updates():
    scheduler = build_scheduler(
        _optimizer(), ScheduleChoice("step", total_steps=None, step_size=3, gamma=0.5)
    )
    assert _lrs(scheduler, 7) == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_plateau_reduces_after_patience_evaluations_without_improvement():
    scheduler = build_scheduler(
        _optimizer(),
        ScheduleChoice("plateau", total_steps=None, plateau_patience=2, plateau_factor=0.5),
    )
    for value in [1.0, 0.9, 0.95, 0.95]:
        scheduler.step_on_metric(value)
    assert scheduler.optimizer.param_groups[0]["lr"] == 1.0
    scheduler.step_on_metric(0.95)  # third evaluation without improvement
    assert scheduler.optimizer.param_groups[0]["lr"] == 0.5
    scheduler.optimizer.step()
    scheduler.step()  # a per-update step keeps the reduced rate
    assert scheduler.optimizer.param_groups[0]["lr"] == 0.5
    state = scheduler.state_dict()
    again = build_scheduler(_optimizer(), ScheduleChoice("plateau", total_steps=None))
    again.load_state_dict(state)
    assert again.lr_lambdas[0].plateau_factor == 0.5


def test_unknown_scheduler_is_an_error_not_a_constant_schedule():
    with pytest.raises(ValueError, match="scheduler_type='exponential' is invalid"):
        build_scheduler(_optimizer(), ScheduleChoice("exponential", total_steps=10))


def _run_lrs(quiet_config, **settings) -> list[float]:
    settings = {**quiet_config, "num_epochs": 8, "batch_size": 16, **settings}
    config = TrainingConfig(**settings, overwrite_output_dir=True)
    recorder = _RecordLR()
    loader = DataLoader(make_classification(n=128), batch_size=16)  # 8 updates an epoch
    TrainingManager(config).train(make_mlp(), loader, callbacks=[recorder])
    return recorder.lrs


def _expected_lrs(warmup: int, updates: int = 64) -> list[float]:
    scheduler = build_scheduler(
        _optimizer(1e-4), ScheduleChoice("cosine", total_steps=updates, warmup_steps=warmup)
    )
    return _lrs(scheduler, updates)


def test_warmup_longer_than_training_is_shortened_with_one_warning(quiet_config, caplog):
    quiet_config.update(warmup_steps=800, scheduler_type="cosine")
    with caplog.at_level("WARNING", logger="traineval"):
        lrs = _run_lrs(quiet_config)
    assert lrs == pytest.approx(_expected_lrs(6))  # a tenth of the 64 updates
    warnings = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
    assert len(warnings) == 1
    assert "warmup_steps=800" in warnings[0]
    assert "64 optimizer updates" in warnings[0]
    assert "first 6" in warnings[0]


def test_the_default_warmup_is_shortened_without_a_warning(quiet_config, caplog):
    del quiet_config["warmup_steps"]  # the default, 1000
    quiet_config.update(scheduler_type="cosine")
    with caplog.at_level("WARNING", logger="traineval"):
        lrs = _run_lrs(quiet_config)
    assert lrs == pytest.approx(_expected_lrs(6))
    assert [r for r in caplog.records if "warmup" in r.getMessage()] == []


def test_a_warmup_steps_set_to_the_defaults_value_is_shortened_with_a_warning(quiet_config, caplog):
    """warmup_steps=1000 written by the user was shortened quietly, as the default is:
    the config could not tell the two apart."""
    quiet_config.update(warmup_steps=1000, scheduler_type="cosine")
    with caplog.at_level("WARNING", logger="traineval"):
        lrs = _run_lrs(quiet_config)
    assert lrs == pytest.approx(_expected_lrs(6))
    assert "warmup_steps=1000 is not shorter than this run's 64 optimizer updates" in caplog.text


def test_warmup_ratio_warms_up_over_a_share_of_the_run(quiet_config):
    del quiet_config["warmup_steps"]  # the ratio replaces it
    quiet_config.update(scheduler_type="cosine")
    assert _run_lrs(quiet_config, warmup_ratio=0.1) == pytest.approx(_expected_lrs(7))  # ceil
    assert _run_lrs(quiet_config, warmup_ratio=0.25) == pytest.approx(_expected_lrs(16))


def test_spec_basic_training_defaults_train_a_small_dataset(tmp_path):
    """SPEC's Basic Training with its default warmup (1000 steps) on wine: 124 training
    rows, batch 16, 40 epochs = 320 updates; it trains (the warmup is shortened)."""
    from sklearn.datasets import load_wine

    from traineval import EvaluationConfig, Evaluator, TaskType

    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(
        torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    )
    train, val = torch.utils.data.random_split(
        data, [124, len(y) - 124], generator=torch.Generator().manual_seed(0)
    )
    config = TrainingConfig(
        num_epochs=40,
        batch_size=16,
        learning_rate=1e-3,
        mixed_precision=True,
        tensorboard_logging=False,
        progress_bar=False,
        output_dir=str(tmp_path / "wine"),
    )
    evaluator = Evaluator(EvaluationConfig(compute_metrics=True, plot_metrics=False))
    result = TrainingManager(config).train(
        make_mlp(features=13, classes=3),
        DataLoader(train, batch_size=16, shuffle=True),
        DataLoader(val, batch_size=64),
        task_type=TaskType.CLASSIFICATION,
        evaluator=evaluator,
    )
    assert result.global_step == 320
    assert result.training_history["val_metrics"][-1]["accuracy"] >= 0.9


def test_parameter_groups_skip_decay_on_biases_and_norm_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 0.1)
    assert {p.ndim for p in decay["params"]} == {2}
    assert len(no_decay["params"]) == 4  # two biases, the norm's weight and bias
    assert no_decay["weight_decay"] == 0.0


def test_model_without_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimizerChoice("adamw", lr=0.1))


def test_cpu_optimizer_uses_fused_kernels():
    optimizer = build_optimizer(nn.Linear(2, 2), OptimizerChoice("adamw", lr=0.1))
    assert optimizer.defaults["fused"] is True


class _RecordLR(Callback):
    """The learning rate each optimizer update actually ran with."""

    def __init__(self):
        self.lrs = []

    def on_train_start(self, loop):
        loop.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.append(optimizer.param_groups[0]["lr"])
        )


@pytest.mark.parametrize("accumulation", [1, 3])
def test_scheduler_steps_once_per_update_over_the_real_number_of_updates(
    quiet_config, accumulation
):
    """onecycle raises if stepped past total_steps, so finishing proves the count is right."""
    quiet_config.update(scheduler_type="onecycle", warmup_steps=3)
    config = TrainingConfig(
        num_epochs=3, batch_size=4, gradient_accumulation_steps=accumulation, **quiet_config
    )
    recorder = _RecordLR()
    loader = DataLoader(make_classification(n=40), batch_size=4)
    result = TrainingManager(config).train(make_mlp(), loader, callbacks=[recorder])
    updates = 3 * math.ceil(10 / accumulation)
    assert result["global_step"] == updates
    assert len(recorder.lrs) == updates
    peak = max(recorder.lrs)
    assert recorder.lrs.index(peak) == 2  # the third update reaches the peak (warmup_steps=3)
    assert recorder.lrs[-1] < peak / 1000


def test_a_warmup_shortened_to_nothing_says_so(caplog):
    """An 8-update run with warmup_steps=100 said it warmed up "over the first 0 (a tenth
    of the run)"."""
    from traineval.training.optim import warmup_updates

    with caplog.at_level("WARNING", logger="traineval"):
        assert warmup_updates(TrainingConfig(warmup_steps=100), 8) == 0
    assert "warming up not at all (a tenth of the run is no update)" in caplog.text
