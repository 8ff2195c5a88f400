"""Shared fixtures: tiny CPU models and data, fixed seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import Callback


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
