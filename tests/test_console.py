"""What a person sees: Python's train() shows its epochs with no setup, a short CPU run with
the defaults warns about nothing, and one setting turns the lines off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.callbacks import EpochSummary

from conftest import make_classification, make_mlp

SCRIPT = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from traineval import TrainingConfig, TrainingManager

torch.manual_seed(0)
x = torch.randn(64, 4)
y = (x[:, 0] > 0).long()
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
config = TrainingConfig(num_epochs=3, batch_size=16, output_dir={out!r}{extra})
loader = DataLoader(TensorDataset(x, y), batch_size=16)
TrainingManager(config).train(model, loader, loader)
print("done")
"""


def _train_in_a_fresh_interpreter(tmp_path, extra: str = "") -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(SCRIPT).format(out=str(tmp_path / "run"), extra=extra)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def test_python_train_prints_a_line_per_epoch_and_no_warning_with_the_defaults(tmp_path):
    done = _train_in_a_fresh_interpreter(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    lines = done.stderr.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train_loss" in line and "val_accuracy" in line for line in lines)
    # no "warmup_steps=1000 is not shorter ...", no "mixed precision is off on cpu"


def test_verbose_false_prints_nothing(tmp_path):
    done = _train_in_a_fresh_interpreter(tmp_path, ", verbose=False")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_warmup_the_user_chose_still_warns_when_it_is_too_long(tmp_path):
    done = _train_in_a_fresh_interpreter(tmp_path, ", verbose=False, warmup_steps=500")
    assert "warmup_steps=500 is not shorter than this run's 12 optimizer updates" in done.stderr


def test_without_a_bar_long_epochs_get_a_line_at_log_steps(quiet_config, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("traineval"), "hasHandlers", lambda: False)
    config = TrainingConfig(
        num_epochs=1, batch_size=8, log_frequency=2, verbose=False, **quiet_config
    )
    summary = EpochSummary(every_seconds=0.0)  # a line at every log step
    TrainingManager(config).train(
        make_mlp(), DataLoader(make_classification(n=64), 8), callbacks=[summary]
    )
    lines = capsys.readouterr().err.splitlines()
    inside = [line for line in lines if "update" in line]
    assert [line.split("  ")[1] for line in inside] == [
        "update 2, 8 an epoch",
        "update 4, 8 an epoch",
        "update 6, 8 an epoch",
        "update 8, 8 an epoch",
    ]
    assert "samples/s" in inside[0]
    assert lines[-1].startswith("epoch 1/1  train_loss ")


@pytest.mark.parametrize("configured", [True, False])
def test_lines_go_to_logging_where_it_is_set_up(configured, caplog, capsys, monkeypatch):
    import logging

    from traineval.callbacks.progress import say

    if not configured:
        monkeypatch.setattr(logging.getLogger("traineval"), "hasHandlers", lambda: False)
    with caplog.at_level(logging.INFO, logger="traineval"):
        say("epoch 1/1  train_loss 0.5")
    logged = "epoch 1/1  train_loss 0.5" in caplog.text
    printed = capsys.readouterr().err == "epoch 1/1  train_loss 0.5\n"
    assert (logged, printed) == ((True, False) if configured else (False, True))
