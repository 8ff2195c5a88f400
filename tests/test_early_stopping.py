"""Early stopping and the best checkpoint, driven by scripted validation losses."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import Evaluator, TrainingConfig, TrainingManager
from traineval.runs.checkpoint import load_checkpoint_file
from traineval.runs.tracking import Plateau

from conftest import make_classification, make_mlp


class ScriptedEvaluator(Evaluator):
    """Returns the next value of a script as the validation loss (and its negation as accuracy)."""

    def __init__(self, losses):
        super().__init__()
        self.losses = list(losses)
        self.calls = 0

    def evaluate_model(self, model, loader, device=None, loss_function=None, **kwargs):
        value = self.losses[self.calls]
        self.calls += 1
        return {"loss": value, "accuracy": -value}


def _train(quiet_config, losses, **overrides):
    quiet_config.update(overrides)
    config = TrainingConfig(num_epochs=len(losses), batch_size=16, **quiet_config)
    data = make_classification(n=32)
    evaluator = ScriptedEvaluator(losses)
    model = make_mlp()
    result = TrainingManager(config).train(
        model, DataLoader(data, 16), DataLoader(data, 16), evaluator=evaluator
    )
    return result, evaluator, model


def test_plateau_counts_evaluations_without_improvement():
    plateau = Plateau(minimize=True, min_delta=0.05)
    assert [plateau.update(v) for v in [1.0, 0.96, 0.9, float("nan"), 0.5]] == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert plateau.num_bad == 0
    maximize = Plateau(minimize=False)
    assert [maximize.update(v) for v in [0.5, 0.4, 0.6]] == [True, False, True]


def test_stops_after_patience_evaluations_without_improvement(quiet_config):
    losses = [1.0, 0.8, 0.9, 0.85, 0.95, 0.7, 0.6]
    result, evaluator, _ = _train(quiet_config, losses, early_stopping_patience=3)
    assert evaluator.calls == 5
    assert result["stopped_early"] is True
    assert "did not improve for 3 evaluations" in result["stop_reason"]
    assert (result["best_metric"], result["best_epoch"]) == (0.8, 2)
    assert result["training_history"]["val_loss"] == losses[:5]
    assert len(result["training_history"]["val_metrics"]) == 5


def test_monitors_a_maximised_metric(quiet_config):
    losses = [1.0, 0.8, 0.9, 0.85, 0.7]
    result, _, _ = _train(
        quiet_config, losses, early_stopping_patience=2, monitor_metric="val_accuracy"
    )
    assert result["monitor_metric"] == "val_accuracy"
    assert (result["best_metric"], result["best_epoch"]) == (-0.8, 2)
    assert result["stopped_early"]


def test_no_early_stopping_when_patience_is_zero(quiet_config):
    result, evaluator, _ = _train(quiet_config, [1.0, 2.0, 3.0, 4.0], early_stopping_patience=0)
    assert evaluator.calls == 4
    assert not result["stopped_early"]
    assert result["best_epoch"] == 1


def test_best_checkpoint_and_restore_best_weights(quiet_config):
    losses = [1.0, 0.5, 0.9, 0.95]
    result, _, model = _train(quiet_config, losses, restore_best_weights=True)
    best = load_checkpoint_file(result["checkpoints"]["best"])
    last = load_checkpoint_file(result["checkpoints"]["last"])
    assert best["epoch"] == 2
    assert last["epoch"] == 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name])
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_unknown_monitored_metric_is_an_error_naming_the_choices(quiet_config, tmp_path):
    # no task is known before the data: a name no task's validation has is refused at once
    with pytest.raises(ValueError, match=r"monitor_metric='val_f2' is invalid: expected one of"):
        _train(quiet_config, [1.0, 0.5], monitor_metric="val_f2")
    assert not (tmp_path / "run").exists()
    # a metric of another task than the data's: named when the evaluation lacks it
    with pytest.raises(ValueError, match=r"monitor_metric='val_mse'.*val_accuracy, val_loss"):
        _train(quiet_config, [1.0, 0.5], monitor_metric="val_mse")


def test_a_chosen_validation_metric_without_a_val_loader_is_refused(quiet_config, tmp_path):
    """monitor_metric='val_accuracy' with no val_loader fell back to train_loss, said only
    at INFO: early stopping and best.pt followed the training loss. The same name in
    stop_when was refused; the default val_loss still falls back."""
    config = TrainingConfig(**quiet_config, num_epochs=1, monitor_metric="val_accuracy")
    train = DataLoader(make_classification(n=32), batch_size=8)
    with pytest.raises(ValueError, match=r"monitor_metric='val_accuracy' is not measured in"):
        TrainingManager(config).train(make_mlp(), train)
    assert not (tmp_path / "run").exists()  # before any work
    default = TrainingConfig(**quiet_config, num_epochs=1)
    assert TrainingManager(default).train(make_mlp(), train)["monitor_metric"] == "train_loss"
