"""training.cpu_threads: the count in force while a run trains, torch's own put back after."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.callbacks import Callback
from traineval.config.checks import SettingError
from traineval.system.cpu_threads import SMALL_MODEL_PARAMETERS, applied, auto_threads, resolve

from conftest import make_classification, make_mlp

CPU = torch.device("cpu")


class Threads(Callback):
    def on_train_start(self, loop):
        self.count = torch.get_num_threads()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize("setting", [0, -2, "many", True, 1.5])
def test_a_bad_thread_count_names_the_field(setting):
    with pytest.raises(SettingError, match=r"cpu_threads=.* is invalid: expected an integer >= 1"):
        TrainingConfig(cpu_threads=setting)


@pytest.mark.parametrize(("setting", "expected"), [(1, 1), (3, 3), (None, "before")])
def test_the_run_trains_with_the_count_and_torchs_returns_after(
    quiet_config, restore_threads, setting, expected
):
    torch.set_num_threads(2)
    seen = Threads()
    config = TrainingConfig(num_epochs=1, batch_size=16, cpu_threads=setting, **quiet_config)
    loader = DataLoader(make_classification(n=32), batch_size=16)
    TrainingManager(config).train(make_mlp(), loader, callbacks=[seen])
    assert seen.count == (2 if expected == "before" else expected)
    assert torch.get_num_threads() == 2


def test_auto_is_one_thread_for_a_small_model_and_torchs_for_a_large_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    small = nn.Linear(10, 10)
    large = nn.Linear(1000, SMALL_MODEL_PARAMETERS // 1000)
    assert auto_threads(small) == 1
    assert auto_threads(large) is None
    assert resolve("auto", torch.device("cuda"), small) is None  # the CPU only
    assert resolve(4, torch.device("meta"), small) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose for the process
    assert auto_threads(small) is None


def test_the_count_is_restored_when_training_fails(restore_threads):
    torch.set_num_threads(2)
    inside = []

    def fail():
        with applied(1, CPU):
            inside.append(torch.get_num_threads())
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail()
    assert inside == [1]
    assert torch.get_num_threads() == 2
