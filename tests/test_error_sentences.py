"""Mistakes a user makes get a sentence that names the value and the fix, not a torch
traceback: labels outside the classes, shapes that do not fit, losses that are not scalars,
YAML with Python tags, a full disk."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TaskType, TrainingConfig, TrainingManager
from traineval.cli import main


def _train(tmp_path, model, x, y, **kwargs):
    config = TrainingConfig(
        num_epochs=1,
        batch_size=8,
        warmup_steps=0,
        progress_bar=False,
        tensorboard_logging=False,
        output_dir=str(tmp_path / "run"),
    )
    return TrainingManager(config).train(model, DataLoader(TensorDataset(x, y), 8), **kwargs)


def test_a_label_outside_the_classes(tmp_path):
    y = torch.tensor([0, 1, 2, 7, 0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"outside the model's 3 classes: .* from 0 to 7") as info:
        _train(tmp_path, nn.Linear(4, 3), torch.randn(8, 4), y)
    assert "labels must be in [0, 3)" in str(info.value)


def test_outputs_and_targets_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match=r"outputs \(8, 2\) float32, targets \(8, 3\) float32"):
        _train(
            tmp_path,
            nn.Linear(4, 2),
            torch.randn(8, 4),
            torch.randn(8, 3),
            task_type=TaskType.REGRESSION,
        )


def test_a_loss_that_returns_a_float(tmp_path):
    with pytest.raises(TypeError, match=r"returned float 1\.0; it must return a scalar tensor"):
        _train(
            tmp_path,
            nn.Linear(4, 3),
            torch.randn(8, 4),
            torch.randint(0, 3, (8,)),
            loss_function=lambda outputs, targets: 1.0,
        )


def test_a_loss_that_is_not_reduced(tmp_path):
    def per_sample(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(ValueError, match=r"per_sample returned a tensor of shape \(8,\).*mean"):
        _train(
            tmp_path,
            nn.Linear(4, 3),
            torch.randn(8, 4),
            torch.randint(0, 3, (8,)),
            loss_function=per_sample,
        )


def test_yaml_with_python_tags_is_one_line(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text('training:\n  seed: !!python/object/apply:os.system ["echo pwned"]\n')
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "evil.yaml" in err
    assert "line 2" in err
    assert "Python tags" in err


def test_a_full_disk_names_the_file_in_one_line(tmp_path, monkeypatch, capsys):
    from traineval import checkpoint

    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    args = [
        "demo",
        "-q",
        "data.name=iris",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=1",
        f"training.output_dir={tmp_path / 'run'}",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "could not write" in err[0]
    assert "No space left on device" in err[0]
    assert str(tmp_path / "run" / "checkpoints") in err[0]
