"""Stop conditions: a metric threshold (`stop_when`) and a time limit (`max_time`), each
recorded as the stop reason, each resumed to the weights of an uninterrupted run."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.config.checks import SettingError

from conftest import make_classification, make_mlp, plain_sgd_config

EPOCHS = 6


def _data():
    train = DataLoader(make_classification(n=96, seed=0), batch_size=8, shuffle=True)
    val = DataLoader(make_classification(n=48, seed=1), batch_size=16)
    return train, val


def _train(quiet_config, out, resume_from=None, **settings):
    torch.manual_seed(0)
    model = make_mlp()
    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(out)},
        learning_rate=0.2,
        batch_size=8,
        **{"num_epochs": EPOCHS, **settings},
    )
    result = TrainingManager(config).train(model, *_data(), resume_from=resume_from)
    return model, result


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_a_threshold_stops_where_the_metric_first_reaches_it_and_resumes_exactly(
    quiet_config, tmp_path
):
    straight, reference = _train(quiet_config, tmp_path / "straight")
    accuracies = [m["accuracy"] for m in reference.training_history["val_metrics"]]
    threshold = accuracies[2]  # reached at epoch 3 at the latest
    first = next(i for i, a in enumerate(accuracies) if a >= threshold) + 1
    assert first < EPOCHS
    _, stopped = _train(quiet_config, tmp_path / "run", stop_when=f"val_accuracy >= {threshold}")
    assert stopped.status == "stopped early"
    assert stopped.epochs_completed == first
    assert stopped.stop_reason.startswith(f"stop_when: val_accuracy {accuracies[first - 1]:.6g}")
    assert f"at epoch {first}" in stopped.stop_reason
    resumed, result = _train(quiet_config, tmp_path / "run", resume_from="auto")
    assert result.global_step == reference.global_step
    assert _equal(resumed, straight)


@pytest.mark.parametrize(
    ("limit", "steps"),
    [("1s", 1), ("13s", 12), ("20s", 19)],
    ids=["first-update", "epoch-boundary", "inside-epoch-2"],
)
def test_a_time_limit_stops_at_a_step_boundary_and_a_resume_continues_exactly(
    quiet_config, tmp_path, monkeypatch, limit, steps
):
    """The clock is looked at after each update and each epoch's end (12 updates an epoch:
    13 looks), never before an epoch's first update, so a resume skips nothing."""
    import traineval.training.loop as loop_module

    straight, reference = _train(quiet_config, tmp_path / "straight")
    ticks = itertools.count()
    with monkeypatch.context() as patched:  # a clock that moves 1 s per look: deterministic
        patched.setattr(loop_module.time, "monotonic", lambda: float(next(ticks)))
        _, stopped = _train(quiet_config, tmp_path / "run", max_time=limit)
    assert stopped.status == "time limit"
    assert stopped.global_step == steps < reference.global_step
    assert stopped.stop_reason.startswith(f"max_time={limit} reached at epoch ")
    assert "resume from " in stopped.stop_reason
    resumed, result = _train(quiet_config, tmp_path / "run", resume_from="auto")
    assert result.global_step == reference.global_step
    assert result.status == "finished"
    assert _equal(resumed, straight)
    history = result.training_history
    assert history["train_loss"] == reference.training_history["train_loss"]


def test_stop_conditions_are_checked_before_training(quiet_config, tmp_path):
    train, val = _data()
    typo = TrainingConfig(num_epochs=1, stop_when="val_acuracy >= 0.9", **quiet_config)
    with pytest.raises(ValueError, match=r"stop_when='val_acuracy >= 0\.9': expected one of"):
        TrainingManager(typo).train(make_mlp(), train, val)
    without_val = TrainingConfig(num_epochs=1, stop_when="val_loss < 0.1", **quiet_config)
    with pytest.raises(ValueError, match="not measured in this run"):
        TrainingManager(without_val).train(make_mlp(), train)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(SettingError, match=r"stop_when='accuracy high' is invalid: expected a"):
        TrainingConfig(stop_when="accuracy high")
    with pytest.raises(SettingError, match=r"max_time='soon' is invalid: expected seconds"):
        TrainingConfig(max_time="soon")
    with pytest.raises(SettingError, match=r"max_time=0 is invalid: expected a duration > 0"):
        TrainingConfig(max_time=0)


def test_a_mode_that_validates_itself_can_be_stopped_on_its_metric(quiet_config):
    """Reinforcement validates by playing episodes (no val_loader): `val_return` is its."""
    from test_reinforcement import RL, ActorCritic, Walk
    from test_reinforcement import _config as rl_config

    config = rl_config(quiet_config, num_epochs=4, stop_when="val_return >= -1000")
    result = TrainingManager(config).train(ActorCritic(), Walk, mode=RL)
    assert result.status == "stopped early"
    assert result.epochs_completed == 1  # any return is >= -1000
    assert result.stop_reason.startswith("stop_when: val_return ")


def test_a_mode_s_own_validation_metric_is_not_refused(quiet_config):
    """A mode whose plan validates itself reports metrics no task has (here `margin`)."""
    import dataclasses
    from typing import ClassVar

    from traineval.modes import Mode, ModePlan, Supervised

    @dataclasses.dataclass(frozen=True)
    class Margins(Mode):
        name: ClassVar[str] = "margins_for_a_test"

        def plan(self, ctx):
            step = Supervised().plan(ctx).step
            return ModePlan(step, evaluate=lambda model: {"margin": 0.5})

    train, val = _data()
    config = TrainingConfig(num_epochs=2, monitor_metric="val_margin",
                            stop_when="val_margin >= 0.5", **quiet_config)  # fmt: skip
    result = TrainingManager(config).train(make_mlp(), train, val, mode=Margins())
    assert result.epochs_completed == 1
    assert result.stop_reason.startswith("stop_when: val_margin 0.5 >= 0.5")


def test_the_command_line_reports_a_time_limit_and_tests_after_the_resume(tmp_path, capsys):
    from traineval.cli import main

    from conftest import iris_demo

    run = tmp_path / "run"
    assert main(iris_demo(run, "training.num_epochs=3", "training.max_time=0.001")) == 0
    printed = capsys.readouterr().out
    assert "max_time=0.001s reached at epoch 1, step 1; resume from" in printed
    assert "Test metrics" not in printed  # the test is for the run's end
    assert main([*iris_demo(run, "training.num_epochs=3"), "--resume", "auto"]) == 0
    assert "Test metrics, best checkpoint" in capsys.readouterr().out
    from traineval import Evaluator

    train, _ = _data()
    config = TrainingConfig(max_time="1h", output_dir=str(tmp_path / "cv"))
    with pytest.raises(ValueError, match="max_time='1h' is not supported in cross-validation"):
        Evaluator().cross_validate(make_mlp, train.dataset, config, n_folds=2)
