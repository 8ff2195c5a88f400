"""Shared fixtures: tiny CPU models and data, fixed seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import Callback

# The references these tests compare against (hand-written loops, torch's own averaged
# model) run in this process, and traineval's cpu_threads="auto" trains their small models
# on one thread: one thread here too, so that both add up in the same order (equal to the
# last bit; with different thread counts parallel reductions may differ by rounding).
torch.set_num_threads(1)


def make_classification(n: int = 128, features: int = 8, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def make_mlp(features: int = 8, classes: int = 3, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@pytest.fixture
def dataset():
    return make_classification()


@pytest.fixture
def loader(dataset):
    return DataLoader(dataset, batch_size=16, shuffle=False)


@pytest.fixture
def quiet_config(tmp_path):
    """Keyword arguments for a fast, silent TrainingConfig writing into tmp_path."""
    return {
        "output_dir": str(tmp_path / "run"),
        "progress_bar": False,
        "tensorboard_logging": False,
        "warmup_steps": 0,
        "scheduler_type": "constant",
        "early_stopping_patience": 0,
        "device": "cpu",
    }


class InterruptAt(Callback):
    """Behave like a SIGTERM arriving during update `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop):
        if loop.state.global_step == self.step:
            loop.request_interrupt("SIGTERM")


def plain_sgd_config(quiet_config, **overrides):
    """A quiet TrainingConfig whose updates a hand-written loop can repeat exactly: plain SGD
    (no momentum, no weight decay, no clipping); reruns may reuse the output directory."""
    from traineval import TrainingConfig

    settings = {
        "optimizer_type": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "gradient_clipping": False,
        "overwrite_output_dir": True,
        **quiet_config,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def iris_demo(output_dir, *overrides):
    """`traineval demo` arguments for a one-epoch MLP run on iris into `output_dir`
    (later overrides win)."""
    return [
        "demo",
        "-q",
        "data.name=iris",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=1",
        "training.warmup_steps=0",
        f"training.output_dir={output_dir}",
        *overrides,
    ]


def hide_package(monkeypatch, prefix, package):
    """Make every import of a module starting with `prefix` fail as if `package` were not
    installed (an optional extra missing)."""
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.startswith(prefix):
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
