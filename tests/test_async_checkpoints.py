"""Checkpoints written in the background: the same files and the same exact resume as
synchronous saves, one write at a time, the run ending only once the last is on disk, and a
failed write raised as the run's error."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from traineval import TrainingManager
from traineval.runs import checkpoint as checkpoint_module
from traineval.runs.checkpoint import load_checkpoint_file, load_safetensors, untied
from traineval.runs.checkpoint_writer import CheckpointWriteError, snapshot
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt
from test_resume import assert_same_state, config, dropout_mlp, loaders, step_losses


def _tensors(value, prefix=""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_async_saves_write_the_same_checkpoints_as_sync_saves(tmp_path, writer):
    runs = {}
    for kind, asynchronous in (("sync", False), ("async", True)):
        model = dropout_mlp(0)
        train, val = loaders(0)
        folder = tmp_path / kind
        settings = {"async_checkpointing": asynchronous, "checkpoint_writer": writer}
        TrainingManager(config(folder, **settings)).train(model, train, val)
        runs[kind] = folder
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint_file(runs["sync"] / "checkpoints" / name)
        b = load_checkpoint_file(runs["async"] / "checkpoints" / name)
        assert a["global_step"] == b["global_step"]
        pairs = zip(_tensors(a), _tensors(b), strict=True)
        for (name_a, x), (name_b, y) in pairs:
            assert name_a == name_b
            assert torch.equal(x, y), name_a
    restored = dropout_mlp(5)
    load_safetensors(restored, runs["async"] / "checkpoints" / "best.safetensors")
    best = load_checkpoint_file(runs["sync"] / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in restored.state_dict().items())


@pytest.mark.parametrize(
    ("interrupt_at", "writer"), [(7, "thread"), (13, "thread"), (13, "process")]
)
def test_a_run_resumed_from_async_checkpoints_equals_the_uninterrupted_one(
    tmp_path, interrupt_at, writer
):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = dropout_mlp(0)
    train, val = loaders(0)
    TrainingManager(config(straight_dir)).train(straight, train, val)

    train, val = loaders(0)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(
            config(resumed_dir, async_checkpointing=True, checkpoint_writer=writer)
        ).train(dropout_mlp(0), train, val, callbacks=[InterruptAt(interrupt_at)])
    # the interrupted run returned only once its checkpoint was on disk
    assert load_checkpoint_file(resumed_dir / "checkpoints" / "last.pt")["global_step"] == (
        interrupt_at
    )
    resumed = dropout_mlp(99)
    train, val = loaders(0)
    TrainingManager(config(resumed_dir, async_checkpointing=True, checkpoint_writer=writer)).train(
        resumed, train, val, resume_from="auto"
    )
    assert_same_state(straight, resumed, straight_dir, resumed_dir)
    assert step_losses(resumed_dir) == step_losses(straight_dir)


def test_one_write_at_a_time_and_the_run_ends_after_the_last(tmp_path, monkeypatch):
    real = checkpoint_module.save_checkpoint_file
    active, most, finished = [0], [0], []
    guard = threading.Lock()

    def slow_save(payload, path):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        real(payload, path)
        with guard:
            active[0] -= 1
        finished.append(payload["global_step"])

    monkeypatch.setattr(checkpoint_module, "save_checkpoint_file", slow_save)
    train, val = loaders(0)
    threaded = config(tmp_path, async_checkpointing=True, checkpoint_writer="thread")
    result = TrainingManager(threaded).train(dropout_mlp(0), train, val)
    assert most[0] == 1  # a second save waited for the first
    assert finished[-1] == result["global_step"]  # the last one landed before train returned
    assert threading.active_count() == 1 or all(
        t.name != "traineval-checkpoint" for t in threading.enumerate()
    )


def test_a_failed_background_write_is_the_runs_error(tmp_path, monkeypatch):
    def full_disk(payload, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_checkpoint_file", full_disk)
    train, val = loaders(0)
    threaded = config(tmp_path, async_checkpointing=True, checkpoint_writer="thread")
    with pytest.raises(CheckpointWriteError, match=r"last\.pt failed: .*No space left"):
        TrainingManager(threaded).train(dropout_mlp(0), train, val)


def test_snapshot_copies_and_untied_keeps_tied_weights_once():
    live = {"w": torch.ones(3), "groups": [{"lr": 0.1}], "step": 4}
    copied = snapshot(live)
    live["w"].add_(1)
    live["groups"][0]["lr"] = 0.5
    assert torch.equal(copied["w"], torch.ones(3))
    assert copied["groups"][0]["lr"] == 0.1
    embedding, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    assert list(untied(model.state_dict())) == ["embedding.weight"]


def test_a_snapshot_copies_a_shared_tensor_once_and_never_two_into_one_buffer():
    embedding, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    state = model.state_dict()  # two names, two tensor objects, one view
    copied = snapshot({"checkpoint": {"model": state}, "weights": untied(state)})
    copies = {id(copied["checkpoint"]["model"][k]) for k in state}
    assert copies == {id(copied["weights"]["embedding.weight"])}  # one copy, still tied
    assert list(untied(copied["checkpoint"]["model"])) == ["embedding.weight"]
    # The next snapshot lends the earlier one's buffers; where the earlier shared one
    # buffer and this one holds two different tensors, each gets a buffer of its own.
    untie = {"embedding.weight": torch.zeros(5, 3), "head.weight": torch.ones(5, 3)}
    again = snapshot({"checkpoint": {"model": untie}, "weights": {}}, reuse=copied)
    assert torch.equal(again["checkpoint"]["model"]["embedding.weight"], torch.zeros(5, 3))
    assert torch.equal(again["checkpoint"]["model"]["head.weight"], torch.ones(5, 3))
