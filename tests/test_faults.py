"""Faults that must lose nothing: disk full, non-finite losses, signals, fp16 overflow."""

from __future__ import annotations

import errno
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from traineval import Callback, TrainingConfig, TrainingManager
from traineval.loggers import read_jsonl
from traineval.runs import checkpoint as checkpoint_module
from traineval.runs.checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    load_safetensors,
    save_checkpoint_file,
    save_safetensors,
)
from traineval.training.loop import TrainingInterrupted
from traineval.training.steplog import NonFiniteError

from conftest import make_classification, make_mlp


def _config(tmp_path, **overrides):
    settings = {
        "num_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "scheduler_type": "constant",
        "early_stopping_patience": 0,
        "log_frequency": 50,
        "output_dir": str(tmp_path / "run"),
        "progress_bar": False,
        "tensorboard_logging": False,
        "device": "cpu",
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint_file({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_file({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint_file({"weights": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated or corrupt"):
        load_checkpoint_file(path)


def _nan_data(bad_index: int, n: int = 64):
    data = make_classification(n=n)
    x, y = data.tensors
    x = x.clone()
    x[bad_index] = float("nan")
    return TensorDataset(x, y)


def test_nan_stops_with_the_step_named_and_checkpoints_stay_finite(tmp_path):
    # batch 8, no shuffle: sample 43 is in micro-batch 5, the 6th optimizer update
    config = _config(tmp_path, checkpoint_every_n_steps=1, log_frequency=4)
    with pytest.raises(NonFiniteError, match=r"loss nan at epoch 1, step 6 .*batch 5 of the"):
        TrainingManager(config).train(make_mlp(), DataLoader(_nan_data(43), 8))
    saved = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_nan_found_later_leaves_a_summary_of_the_updates_before_it(tmp_path):
    # the 6th update (micro-batch 5) is NaN; its loss is read back at the 8th, a log step
    config = _config(tmp_path, log_frequency=8)
    with pytest.raises(NonFiniteError, match=r"loss nan at epoch 1, step 6 "):
        TrainingManager(config).train(make_mlp(), DataLoader(_nan_data(43), 8))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "step 6" in summary["stop_reason"]
    trained = {k: summary[k] for k in ("global_step", "epochs_completed", "batches_into_epoch")}
    assert trained == {"global_step": 5, "epochs_completed": 0, "batches_into_epoch": 5}
    assert summary["updates_trained"] == 5


class _FailsAtBatch(torch.nn.Module):
    """An MLP whose forward raises at its `n`-th training batch."""

    def __init__(self, n: int):
        super().__init__()
        self.net, self.n, self.seen = make_mlp(), n, 0

    def forward(self, x):
        if self.training:
            self.seen += 1
            if self.seen == self.n:
                raise RuntimeError(f"boom at training batch {self.n}")
        return self.net(x)


@pytest.mark.parametrize(("batch", "epochs"), [(1, 0), (9, 1), (10, 1)])
def test_a_run_failing_at_an_epochs_first_batch_has_not_completed_it(tmp_path, batch, epochs):
    # 8 batches an epoch: batch 9 is epoch 2's first (summary.json had said 2 epochs done)
    with pytest.raises(RuntimeError, match="boom"):
        TrainingManager(_config(tmp_path, num_epochs=3)).train(
            _FailsAtBatch(batch), DataLoader(make_classification(n=64), 8)
        )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["epochs_completed"] == epochs
    assert summary["global_step"] == batch - 1
    assert summary["batches_into_epoch"] == (batch - 1) % 8


def test_skip_policy_skips_and_counts_non_finite_steps(tmp_path):
    config = _config(tmp_path, skip_nonfinite_steps=1, log_frequency=1, num_epochs=1)
    result = TrainingManager(config).train(make_mlp(), DataLoader(_nan_data(43), 8))
    assert result["global_step"] == 7  # 8 windows, one skipped
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert records[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["train_step_loss"]) for r in records)


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path):
    x, y = make_classification(n=64).tensors
    x = x.clone()
    x[16:40] = float("nan")  # windows 3, 4 and 5
    config = _config(tmp_path, skip_nonfinite_steps=2)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        TrainingManager(config).train(make_mlp(), DataLoader(TensorDataset(x, y), 8))


class _InfGradientAt(Callback):
    """Turn one update's gradient into inf, as an fp16 overflow would."""

    def __init__(self, step: int):
        self.step = step
        self.fired = False
        self.scheduler_steps = []

    def on_train_start(self, loop):
        def hook(grad):
            if loop.state.global_step == self.step and not self.fired:
                self.fired = True
                return grad * math.inf
            return grad

        next(loop.model.parameters()).register_hook(hook)

    def on_epoch_end(self, loop, logs):
        self.scheduler_steps.append((loop.state.global_step, loop.scheduler.last_epoch))


def test_fp16_steps_skipped_by_the_scaler_are_not_updates(tmp_path):
    spy = _InfGradientAt(step=3)
    config = _config(tmp_path, precision="fp16", num_epochs=1, scheduler_type="cosine")
    result = TrainingManager(config).train(
        make_mlp(), DataLoader(make_classification(n=64), 8), callbacks=[spy]
    )
    assert result["global_step"] == 7  # 8 windows, the 4th skipped by the GradScaler
    assert spy.scheduler_steps == [(7, 7)]  # the schedule did not advance on the skipped one


@pytest.mark.parametrize("clipping", [True, False])
def test_skip_policy_skips_a_non_finite_gradient_under_a_finite_loss(tmp_path, clipping):
    """Without clipping the gradient's norm was measured only on log steps: the skip policy
    checked the loss alone and stepped an inf gradient into the weights."""
    config = _config(
        tmp_path,
        skip_nonfinite_steps=1,
        gradient_clipping=clipping,
        num_epochs=1,
        scheduler_type="cosine",
        overwrite_output_dir=True,
    )
    model = make_mlp()
    result = TrainingManager(config).train(
        model, DataLoader(make_classification(n=64), 8), callbacks=[_InfGradientAt(step=3)]
    )
    assert result["global_step"] == 7  # 8 windows, the 4th skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _SignalAt(Callback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, loop):
        if loop.state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resumable_checkpoint_and_stops(tmp_path, signum):
    config = _config(tmp_path, num_epochs=3)
    loader = DataLoader(make_classification(n=64), 8)
    with pytest.raises(TrainingInterrupted, match=r"resume with resume_from=.*last\.pt") as info:
        TrainingManager(config).train(make_mlp(), loader, callbacks=[_SignalAt(5, signum)])
    assert info.value.signal_name == signal.Signals(signum).name
    saved = load_checkpoint_file(info.value.checkpoint)
    assert (saved["global_step"], saved["loop"]["batch_in_epoch"]) == (5, 5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    result = TrainingManager(config).train(make_mlp(), loader, resume_from="auto")
    assert result["global_step"] == 24


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied


def test_safetensors_round_trip_with_tied_weights(tmp_path):
    model = _Tied()
    save_safetensors(model, tmp_path / "w.safetensors")
    restored = _Tied()
    load_safetensors(restored, tmp_path / "w.safetensors")
    assert torch.equal(restored.embed.weight, model.embed.weight)
    assert restored.out.weight is restored.embed.weight
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        load_safetensors(restored, tmp_path / "bad.safetensors")


class _RandomSamples(Dataset):
    """Each sample draws from NumPy's and torch's global generators inside the worker."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([np.random.rand(), torch.rand(()).item(), info.id])


def test_workers_get_distinct_reproducible_seeds(tmp_path):
    from traineval.system.seeding import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(3)
        batches = list(DataLoader(_RandomSamples(), batch_size=1, num_workers=2))
        draws.append(torch.cat(batches))
    assert torch.equal(draws[0], draws[1])  # reproducible
    by_worker = {int(row[2]): row[0].item() for row in draws[0]}
    assert len(set(by_worker.values())) == 2  # distinct per worker


class _NaNFromSecondValidation(nn.Module):
    """Predicts NaN from its `after`-th validation on (one validation batch each)."""

    def __init__(self, after=2):
        super().__init__()
        self.net = nn.Linear(8, 3)
        self.validations, self.after = 0, after

    def forward(self, x):
        out = self.net(x)
        if not self.training:
            self.validations += 1
            if self.validations >= self.after:
                out = out * float("nan")
        return out


def test_a_nan_validation_names_epoch_and_step_and_saves_the_training_first(tmp_path):
    from traineval.training.loop import EvaluationError

    data = make_classification(n=64, seed=1)
    train = DataLoader(data, batch_size=8)
    val = DataLoader(make_classification(n=16, seed=2), batch_size=16)
    config = _config(tmp_path, num_epochs=3, monitor_metric="val_accuracy")
    with pytest.raises(EvaluationError, match=r"validation at epoch 2, step 16 failed: ") as info:
        TrainingManager(config).train(_NaNFromSecondValidation(), train, val)
    assert "predictions contain NaN" in str(info.value)
    assert "last.pt" in str(info.value)
    saved = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["global_step"] == 16  # the second epoch's training is kept
    # resuming redoes that validation (here with a model that is fine again)
    model = _NaNFromSecondValidation(after=99)
    resumed = TrainingManager(config).train(model, train, val, resume_from="auto")
    assert resumed["global_step"] == 24
    assert len(resumed["training_history"]["val_metrics"]) == 3


def test_a_nan_monitored_metric_is_named(tmp_path):
    from traineval.training.loop import EvaluationError

    data = make_classification(n=64, seed=1)
    val = DataLoader(make_classification(n=16, seed=2), batch_size=16)

    def nan_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets) * (
            float("nan") if not torch.is_grad_enabled() else 1.0
        )

    config = _config(tmp_path, num_epochs=1, monitor_metric="val_loss")
    with pytest.raises(
        EvaluationError, match=r"epoch 1, step 8 failed: the monitored metric val_loss is nan"
    ):
        TrainingManager(config).train(make_mlp(), DataLoader(data, 8), val, loss_function=nan_loss)


def test_an_empty_validation_loader_is_refused_before_training(tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), 8)
    train = DataLoader(make_classification(n=64, seed=1), batch_size=8)
    with pytest.raises(ValueError, match="val_loader is empty"):
        TrainingManager(_config(tmp_path)).train(make_mlp(), train, empty)
    assert not (tmp_path / "run" / "checkpoints").exists()


class _HeldGenerator(Dataset):
    """Draws from a NumPy generator created in __init__ (the common mistake)."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.legacy = np.random.RandomState(0)

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor([self.rng.random(), self.legacy.rand()]), torch.tensor(index % 2)


def test_a_generator_held_by_the_dataset_draws_differently_in_each_worker(tmp_path, caplog):
    from traineval.system.seeding import reseed_held_generators

    loader = DataLoader(_HeldGenerator(), batch_size=8, num_workers=2)
    plain = torch.cat([x for x, _ in loader])
    assert len(set(plain[:, 0].tolist())) == 32  # the copies repeat: 2 workers, same draws
    assert reseed_held_generators(loader) == ["dataset.rng", "dataset.legacy"]
    torch.manual_seed(5)
    first = torch.cat([x for x, _ in loader])
    torch.manual_seed(5)
    second = torch.cat([x for x, _ in loader])
    assert len(set(first[:, 0].tolist())) == 64
    assert len(set(first[:, 1].tolist())) == 64
    assert torch.equal(first, second)  # reproducible from the loader's seed
    with caplog.at_level("WARNING"):
        config = _config(tmp_path, num_epochs=1)
        fresh = DataLoader(_HeldGenerator(), batch_size=8, num_workers=2)
        TrainingManager(config).train(nn.Linear(2, 2), fresh)
    assert "dataset.rng, dataset.legacy are a NumPy generator" in caplog.text


def test_accumulation_with_batch_norm_warns(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    train = DataLoader(make_classification(n=64, seed=1), batch_size=8)
    with caplog.at_level("WARNING"):
        TrainingManager(_config(tmp_path, num_epochs=1, gradient_accumulation_steps=2)).train(
            model, train
        )
    assert "gradient_accumulation_steps=2 with batch norm (1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        TrainingManager(_config(tmp_path / "b", num_epochs=1)).train(model, train)
    assert "batch norm" not in caplog.text
