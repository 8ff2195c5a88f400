"""Device choice and mixed precision on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import Callback, TrainingConfig, TrainingManager
from traineval.training.precision import available_device, resolve_device, resolve_precision

from conftest import make_classification, make_mlp


class _Spy(Callback):
    def __init__(self):
        self.scalers = []
        self.growth = []

    def on_epoch_start(self, loop):
        self.scalers.append(loop.scaler)

    def on_epoch_end(self, loop, logs):
        scaler = loop.scaler
        if scaler is not None:
            self.growth.append(scaler.state_dict()["_growth_tracker"])


class _DtypeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_mlp()
        self.seen = set()

    def forward(self, x):
        out = self.inner(x)
        self.seen.add(out.dtype)
        return out


def test_auto_device_on_a_cpu_machine_is_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert resolve_device("auto").type == "cpu"


def test_unavailable_cuda_falls_back_to_cpu_with_a_warning(caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with caplog.at_level(logging.WARNING):
        assert resolve_device("cuda").type == "cpu"
    assert "CUDA is not available" in caplog.text


def test_a_gpu_index_without_cuda_falls_back_to_cpu_naming_it(caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with caplog.at_level(logging.WARNING):
        assert resolve_device("cuda:1").type == "cpu"
        assert TrainingManager(TrainingConfig(device="cuda:1")).device.type == "cpu"
    assert "device='cuda:1' was asked for but CUDA is not available" in caplog.text


def test_a_gpu_index_beyond_the_machines_gpus_is_refused_naming_them(monkeypatch):
    """device="cuda:3" on a machine with one GPU: one line naming the GPUs there are,
    before any work (training, evaluate and predict alike)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    expected = r"device='cuda:3' is invalid: this machine has 1 CUDA device\(s\), cuda:0 to"
    with pytest.raises(ValueError, match=expected):
        resolve_device("cuda:3")
    with pytest.raises(ValueError, match=expected):
        available_device("cuda:3")


def test_resolving_a_gpu_index_changes_nothing_and_the_manager_makes_it_current(monkeypatch):
    """`resolve_device` only answers; the manager (and predict) make `cuda:1` the current
    device, so streams and memory statistics follow it."""
    made: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert made == []
    assert TrainingManager(TrainingConfig(device="cuda:1")).device == torch.device("cuda:1")
    assert made == [torch.device("cuda:1")]
    TrainingManager(TrainingConfig(device="cuda"))
    assert made == [torch.device("cuda:1")]


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch):
    """Each rank takes cuda:LOCAL_RANK; a device naming one GPU would be ignored."""
    from traineval.system.distributed import Distributed, _rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="device='cuda:1' names one GPU, but under torchrun"):
        _rank_device("cuda:1", Distributed(1, 2, 1))
    assert _rank_device("cuda", Distributed(1, 2, 1)) == "cuda:1"


def test_auto_precision_on_cpu_is_fp32_and_says_so_only_when_debugging(caplog):
    with caplog.at_level(logging.INFO):  # the default asked for nothing: no notice
        precision = resolve_precision("auto", torch.device("cpu"))
    assert precision.name == "fp32"
    assert precision.scaler is None
    assert caplog.text == ""
    with caplog.at_level(logging.DEBUG):
        resolve_precision("auto", torch.device("cpu"))
    assert "mixed precision is off on cpu" in caplog.text


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16(quiet_config):
    model = _DtypeProbe()
    config = TrainingConfig(num_epochs=1, batch_size=16, precision="bf16", **quiet_config)
    result = TrainingManager(config).train(model, DataLoader(make_classification(n=32), 16))
    assert model.seen == {torch.bfloat16}
    assert result["training_history"]["train_loss"][0] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_grad_scaler_is_built_once_and_kept_across_epochs(quiet_config):
    spy = _Spy()
    config = TrainingConfig(num_epochs=3, batch_size=16, precision="fp16", **quiet_config)
    loader = DataLoader(make_classification(n=64), 16)
    TrainingManager(config).train(make_mlp(), loader, callbacks=[spy])
    assert spy.scalers[0] is not None
    assert all(s is spy.scalers[0] for s in spy.scalers)
    assert spy.growth == [4, 8, 12]  # the scaler's count of good steps runs on across epochs


def test_mixed_precision_off_is_fp32():
    config = TrainingConfig(mixed_precision=False)
    assert resolve_precision(config.precision, torch.device("cpu")).name == "fp32"


def test_fp16_clipping_sees_the_unscaled_gradient(quiet_config, tmp_path):
    """The logged pre-clip norm is the true norm, not one inflated by the loss scale (65536)."""
    from traineval.loggers import read_jsonl

    norms = {}
    for precision in ("fp32", "fp16"):
        quiet_config["output_dir"] = str(tmp_path / precision)
        config = TrainingConfig(
            num_epochs=1,
            batch_size=16,
            precision=precision,
            max_grad_norm=0.01,
            log_frequency=1,
            **quiet_config,
        )
        TrainingManager(config).train(make_mlp(), DataLoader(make_classification(n=64), 16))
        records = read_jsonl(tmp_path / precision / "metrics.jsonl")
        norms[precision] = [r["grad_norm"] for r in records if r["event"] == "train"]
    assert norms["fp16"][0] == pytest.approx(norms["fp32"][0], rel=0.05)
