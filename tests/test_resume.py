"""Exact resume: an interrupted and resumed run equals the uninterrupted one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import Callback, TrainingConfig, TrainingManager
from traineval.loggers import read_jsonl
from traineval.runs.checkpoint import load_checkpoint_file
from traineval.training.loop import TrainingInterrupted, TrainState

from conftest import InterruptAt, make_classification


def dropout_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def loaders(workers: int):
    data = make_classification(n=100, seed=1)
    val = make_classification(n=40, seed=2)
    generator = torch.Generator().manual_seed(123)
    train = DataLoader(data, batch_size=8, shuffle=True, num_workers=workers, generator=generator)
    return train, DataLoader(val, batch_size=20, num_workers=workers)


def config(path, **overrides):
    settings = {
        "num_epochs": 4,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "gradient_accumulation_steps": 2,
        "warmup_steps": 3,
        "scheduler_type": "cosine",
        "log_frequency": 1,
        "eval_frequency": 5,
        "early_stopping_patience": 0,
        "checkpoint_every_n_steps": 2,
        "output_dir": str(path),
        "progress_bar": False,
        "tensorboard_logging": False,
        "device": "cpu",
        "seed": 11,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def step_losses(path):
    return [
        (r["step"], r["train_step_loss"])
        for r in read_jsonl(path / "metrics.jsonl")
        if r["event"] == "train"
    ]


def assert_same_state(a: nn.Module, b: nn.Module, path_a, path_b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    opt_a = load_checkpoint_file(path_a / "checkpoints" / "last.pt")["optimizer"]
    opt_b = load_checkpoint_file(path_b / "checkpoints" / "last.pt")["optimizer"]
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            other = opt_b["state"][key][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, name)


@pytest.mark.parametrize(
    ("workers", "interrupt_at"),
    [(0, 7), (0, 13), (2, 14), (2, 20)],  # 7 updates per epoch: epoch ends and mid-epoch
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, workers, interrupt_at):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = dropout_mlp(0)
    train, val = loaders(workers)
    TrainingManager(config(straight_dir)).train(straight, train, val)

    first = dropout_mlp(0)
    train, val = loaders(workers)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at epoch \d, step \d+; resume with"):
        TrainingManager(config(resumed_dir)).train(
            first, train, val, callbacks=[InterruptAt(interrupt_at)]
        )
    saved = load_checkpoint_file(resumed_dir / "checkpoints" / "last.pt")
    assert saved["global_step"] == interrupt_at
    interrupted = json.loads((resumed_dir / "summary.json").read_text())  # status interrupted

    resumed = dropout_mlp(99)  # different weights: everything must come from the checkpoint
    train, val = loaders(workers)
    result = TrainingManager(config(resumed_dir)).train(resumed, train, val, resume_from="auto")

    assert result["global_step"] == 4 * 7
    assert result["updates_trained"] == 4 * 7 - interrupt_at  # this call's share
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert (summary["updates_trained"], interrupted["updates_trained"]) == (
        4 * 7 - interrupt_at,
        interrupt_at,
    )
    assert_same_state(straight, resumed, straight_dir, resumed_dir)
    assert step_losses(resumed_dir) == step_losses(straight_dir)
    straight_state = TrainState()
    straight_state.load_state_dict(
        load_checkpoint_file(straight_dir / "checkpoints" / "last.pt")["loop"]
    )
    straight_history = {"history": straight_state.history}
    assert result["training_history"]["train_loss"] == straight_history["history"]["train_loss"]
    assert result["training_history"]["val_metrics"] == straight_history["history"]["val_metrics"]


def test_resume_refuses_a_config_that_changes_the_data_order(tmp_path, caplog):
    train, val = loaders(0)
    TrainingManager(config(tmp_path, num_epochs=1)).train(dropout_mlp(0), train, val)
    with pytest.raises(ValueError, match=r"cannot resume.*batch_size: checkpoint 8, now 4"):
        TrainingManager(config(tmp_path, batch_size=4)).train(
            dropout_mlp(0), train, val, resume_from="auto"
        )
    with caplog.at_level(logging.WARNING):
        result = TrainingManager(config(tmp_path, num_epochs=2)).train(
            dropout_mlp(0), train, val, resume_from="auto"
        )
    assert "cosine schedule was planned as warmup 3 over 7 updates and is now warmup 3 over 14" in (
        caplog.text
    )
    assert result["epochs_completed"] == 2
    # the optimizer's saved state is per parameter group: changing the groups is refused
    for change, shown in (
        ({"lr_multipliers": {"0": 0.1}}, r"lr_multipliers: checkpoint \{\}, now \{'0': 0\.1\}"),
        ({"frozen_parameters": ("0",)}, r"frozen_parameters: checkpoint \[\], now \['0'\]"),
        ({"weight_decay": 0.0}, r"weight_decay: checkpoint 1e-05, now 0\.0 \(zero and non-zero"),
        ({"optimizer_type": "sgd"}, r"optimizer_type: checkpoint 'adamw', now 'sgd'"),
    ):
        with pytest.raises(
            ValueError, match=r"changes the optimizer or its parameter groups \(" + shown
        ):
            TrainingManager(config(tmp_path, num_epochs=3, **change)).train(
                dropout_mlp(0), train, val, resume_from="auto"
            )


class SetGroups(Callback):
    """The reference for a resume with other optimizer settings: the uninterrupted run,
    given those settings after update `at`."""

    def __init__(self, at: int, lr: float, weight_decay: float, betas: tuple[float, float]):
        self.at, self.lr, self.decay, self.betas = at, lr, weight_decay, betas

    def on_step_end(self, loop):
        if loop.state.global_step == self.at:
            for group in loop.optimizer.param_groups:
                group["lr"], group["betas"] = self.lr, self.betas
                if group["weight_decay"]:
                    group["weight_decay"] = self.decay


def test_a_resume_with_another_learning_rate_decay_and_betas_trains_with_them(tmp_path, caplog):
    """The checkpoint's optimizer state held the earlier lr, weight decay and betas, and
    load_state_dict restored them over the config's: the resume warned 'changed' and trained
    on at the old values (adam_beta1 did not even warn)."""
    constant = {"scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.01}
    straight = dropout_mlp(0)
    switch = SetGroups(13, lr=1e-2, weight_decay=0.05, betas=(0.5, 0.999))
    TrainingManager(config(tmp_path / "straight", **constant)).train(
        straight, *loaders(0), callbacks=[switch]
    )
    run = tmp_path / "run"
    TrainingManager(config(run, max_steps=13, **constant)).train(dropout_mlp(0), *loaders(0))
    resumed = dropout_mlp(0)
    changed = {**constant, "learning_rate": 1e-2, "weight_decay": 0.05, "adam_beta1": 0.5}
    with caplog.at_level(logging.WARNING):
        TrainingManager(config(run, **changed)).train(resumed, *loaders(0), resume_from="auto")
    assert_same_state(resumed, straight, run, tmp_path / "straight")
    assert "adam_beta1 was 0.9 in the checkpoint and is 0.5 now" in caplog.text
    rates = {r["learning_rate"] for r in read_jsonl(run / "metrics.jsonl") if r["step"] > 13
             and r["event"] == "train"}  # fmt: skip
    assert rates == {1e-2}


def test_a_resumed_schedule_follows_the_new_learning_rate(tmp_path):
    """cosine over 28 updates: after the resume at update 13 the rates are those of a run
    planned with the new rate from the start (the schedule's factor times the new base)."""

    def rates(path):  # fmt: skip
        return {r["step"]: r["learning_rate"] for r in read_jsonl(path / "metrics.jsonl")
                if r["event"] == "train"}  # fmt: skip

    TrainingManager(config(tmp_path / "new", learning_rate=6e-3)).train(dropout_mlp(0), *loaders(0))
    run = tmp_path / "run"
    TrainingManager(config(run, max_steps=13)).train(dropout_mlp(0), *loaders(0))
    TrainingManager(config(run, learning_rate=6e-3)).train(
        dropout_mlp(0), *loaders(0), resume_from="auto"
    )
    after = {step: rate for step, rate in rates(run).items() if step > 13}
    assert after == {step: rate for step, rate in rates(tmp_path / "new").items() if step > 13}
    assert len(after) == 28 - 13
    onecycle = run.parent / "onecycle"
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(onecycle, scheduler_type="onecycle")).train(
            dropout_mlp(0), *loaders(0), callbacks=[InterruptAt(13)]
        )
    with pytest.raises(ValueError, match=r"planned up to a learning rate of 0\.003, this run's"):
        TrainingManager(config(onecycle, scheduler_type="onecycle", learning_rate=6e-3)).train(
            dropout_mlp(0), *loaders(0), resume_from="auto"
        )


class SetRateOnce(Callback):
    """A step decay by hand: `set_learning_rate` once, at update 5."""

    def on_step_end(self, loop):
        if loop.state.global_step == 5:
            loop.set_learning_rate(1e-2)


@pytest.mark.parametrize(
    "settings",
    [
        {"scheduler_type": "onecycle", "optimizer_type": "adamw"},  # it cycles beta1
        {"scheduler_type": "onecycle", "optimizer_type": "sgd"},  # and momentum
        {"scheduler_type": "constant", "warmup_steps": 0, "callbacks": SetRateOnce},
    ],
    ids=["onecycle-adamw", "onecycle-sgd", "set_learning_rate"],
)
def test_a_resume_with_the_same_settings_keeps_what_the_run_moved_them_to(tmp_path, settings):
    """Putting the config's settings back at every resume (not only the changed ones) reset
    one-cycle's cycled beta1/momentum and a rate a callback had set: not bitwise."""
    settings = dict(settings)
    made = settings.pop("callbacks", None)
    callbacks = [made()] if made else []
    straight = dropout_mlp(0)
    TrainingManager(config(tmp_path / "straight", **settings)).train(
        straight, *loaders(0), callbacks=callbacks
    )
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(run, **settings)).train(
            dropout_mlp(0), *loaders(0), callbacks=[*callbacks, InterruptAt(13)]
        )
    resumed = dropout_mlp(0)
    TrainingManager(config(run, **settings)).train(
        resumed, *loaders(0), callbacks=[made()] if made else [], resume_from="auto"
    )
    assert_same_state(resumed, straight, run, tmp_path / "straight")


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, caplog):
    train, val = loaders(0)
    model = dropout_mlp(0)
    TrainingManager(config(tmp_path, num_epochs=1)).train(model, train, val)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = dropout_mlp(5)
    with caplog.at_level(logging.INFO):
        result = TrainingManager(config(tmp_path, num_epochs=1)).train(
            again, train, val, resume_from="auto"
        )
    assert "already finished" in caplog.text
    assert result["global_step"] == 7
    assert result.updates_trained == 0  # this call trained nothing
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    # a kill before its summary.json was written: the result still names its checkpoints
    (tmp_path / "summary.json").unlink()
    result = TrainingManager(config(tmp_path, num_epochs=1)).train(
        dropout_mlp(5), train, val, resume_from="auto"
    )
    assert result.checkpoints["best"] == str(tmp_path / "checkpoints" / "best.pt")


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_resuming_a_finished_run_that_restored_its_best_weights_gives_those(tmp_path, sharding):
    """The run ended with its best weights in the model (restore_best_weights); its resume
    ("already finished") gave the last weights instead."""
    train, val = loaders(0)
    settings = {
        "num_epochs": 4,
        "restore_best_weights": True,
        "learning_rate": 0.5,  # too high: a later epoch is worse than the best
        "checkpoint_sharding": sharding,
    }
    model = dropout_mlp(0)
    result = TrainingManager(config(tmp_path, **settings)).train(model, train, val)
    assert result["best_step"] < result["global_step"]  # the best is not the last
    again = dropout_mlp(5)
    TrainingManager(config(tmp_path, **settings)).train(again, train, val, resume_from="auto")
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_auto_resume_skips_a_corrupt_checkpoint_and_starts_fresh_without_one(tmp_path, caplog):
    train, val = loaders(0)
    with caplog.at_level(logging.INFO):
        result = TrainingManager(config(tmp_path / "new", num_epochs=1)).train(
            dropout_mlp(0), train, val, resume_from="auto"
        )
    assert "starting fresh" in caplog.text
    assert result["global_step"] == 7

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(run)).train(dropout_mlp(0), train, val, callbacks=[InterruptAt(10)])
    best_step = load_checkpoint_file(run / "checkpoints" / "best.pt")["global_step"]
    (run / "checkpoints" / "last.pt").write_bytes(b"garbage")  # the newest file is corrupt
    with caplog.at_level(logging.INFO):
        resumed = TrainingManager(config(run)).train(dropout_mlp(0), train, val, resume_from="auto")
    assert "skipping checkpoint" in caplog.text
    assert "last.pt" in caplog.text
    assert f"(step {best_step})" in caplog.text
    assert resumed["global_step"] == 28


def test_a_signal_inside_an_accumulation_window_is_handled_at_its_end(tmp_path):
    """SIGTERM during the first micro-batch of a window: the save waits for the update."""
    straight_dir, run = tmp_path / "straight", tmp_path / "run"
    straight = dropout_mlp(0)
    train, val = loaders(0)
    TrainingManager(config(straight_dir)).train(straight, train, val)

    model = dropout_mlp(0)
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == 9 and module.training:  # the 1st micro-batch of update 5
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    model.register_forward_pre_hook(hook)
    train, val = loaders(0)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(run)).train(model, train, val)
    saved = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert (saved["global_step"], saved["loop"]["batch_in_epoch"]) == (5, 10)

    resumed = dropout_mlp(1)
    train, val = loaders(0)
    TrainingManager(config(run)).train(resumed, train, val, resume_from="auto")
    assert_same_state(straight, resumed, straight_dir, run)


def test_deterministic_mode_is_on_during_training_only(tmp_path):
    seen = []

    class Probe(Callback):
        def on_epoch_start(self, loop):
            seen.append(torch.are_deterministic_algorithms_enabled())

    train, val = loaders(0)
    TrainingManager(config(tmp_path, num_epochs=1, deterministic=True)).train(
        dropout_mlp(0), train, val, callbacks=[Probe()]
    )
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(("now", "warned"), [({"mixed_precision": False}, False), ({}, True)])
def test_an_older_record_with_mixed_precision_reads_as_its_precision(now, warned, caplog):
    """Records written before `precision` alone was saved carry both keys: `mixed_precision:
    false` beside `precision: auto` is fp32, so resuming it as fp32 warns of nothing."""
    from traineval.runs.resume import check_compatible

    older = {**TrainingConfig().to_dict(), "mixed_precision": False, "precision": "auto"}
    with caplog.at_level(logging.WARNING):
        check_compatible(older, TrainingConfig(**now).to_dict(), 1, 1)
    said = "precision was 'fp32' in the checkpoint and is 'auto' now" in caplog.text
    assert said == warned
    assert ("CHANGED CONFIG" in caplog.text) == warned


def test_an_iterable_dataset_stopped_inside_an_epoch_resumes_exactly(tmp_path):
    """A stream has no batch sampler to skip by: the resumed run reads and drops the
    epoch's first batches (torch refused the rebuilt loader before)."""
    from torch.utils.data import IterableDataset

    x, y = make_classification(100).tensors

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y, strict=True)

    straight, resumed, _, _ = straight_and_resumed(
        tmp_path, lambda: DataLoader(Stream(), batch_size=8), 5, max_steps=30
    )
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stop_at", [10, 13], ids=["epoch-end", "inside-an-epoch"])
def test_persistent_workers_resume_to_the_uninterrupted_shuffle(tmp_path, stop_at):
    """Persistent workers draw their seed from the loader's generator once, as they start:
    at the first epoch of an uninterrupted run, in a later one of a resumed run, which then
    shuffled every later epoch differently. (5 updates an epoch.)"""
    data = make_classification(40)

    def loader() -> DataLoader:
        generator = torch.Generator().manual_seed(3)
        return DataLoader(
            data, 8, shuffle=True, num_workers=2, persistent_workers=True, generator=generator
        )

    straight, resumed, expected, result = straight_and_resumed(
        tmp_path, loader, stop_at, num_epochs=4
    )
    history = result["training_history"]["train_loss"]
    assert history == expected["training_history"]["train_loss"]
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class EagerlyShuffledBatches(torch.utils.data.Sampler):
    """A batch sampler that shuffles as its iter is called (Python's random module), not
    as batches are drawn: a loader with workers calls it twice an epoch."""

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        import random

        batches = [list(range(i, i + 8)) for i in range(0, 40, 8)]
        random.shuffle(batches)
        return iter(batches)


def test_an_eager_batch_sampler_with_workers_resumes_exactly(tmp_path):
    """The resumed epoch's sampler was called once where the uninterrupted run's was
    called twice (its skipping wrapper called it lazily), so it drew another order."""
    data = make_classification(40)

    straight, resumed, _, _ = straight_and_resumed(
        tmp_path,
        lambda: DataLoader(data, batch_sampler=EagerlyShuffledBatches(), num_workers=2),
        3,
        num_epochs=2,
    )
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def straight_and_resumed(tmp_path, loader, stop_at: int, **settings):
    """An uninterrupted run, and one stopped at update `stop_at` then resumed (from other
    weights: the checkpoint's must win), both from `linear()`'s weights on `loader()`: the
    two models and their results."""

    def run(folder, model, **options):
        config = TrainingConfig(
            batch_size=8,
            seed=0,
            output_dir=str(folder),
            progress_bar=False,
            tensorboard_logging=False,
            device="cpu",
            **settings,
        )
        return TrainingManager(config).train(model, loader(), **options)

    straight = linear()
    expected = run(tmp_path / "straight", straight)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "stopped", linear(), callbacks=[InterruptAt(stop_at)])
    resumed = nn.Linear(8, 3)
    result = run(tmp_path / "stopped", resumed, resume_from="auto")
    return straight, resumed, expected, result


def linear() -> nn.Module:
    """The same starting weights every time."""
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def test_cutting_back_a_damaged_metrics_file_keeps_its_records_byte_for_byte(tmp_path):
    """A line nested too deeply for json crashed the resume's cut (RecursionError), and bad
    bytes crashed it (UnicodeDecodeError); the records kept stay as they were written."""
    from traineval.runs.resume import truncate_events

    events = tmp_path / "metrics.jsonl"
    first = '{"event": "train", "step": 1, "note": "café"}\n'.encode()
    second = b'{"event": "train", "step": 2}\n'
    events.write_bytes(first + b"[" * 100_000 + b"\n" + b"\xff\xfe{\n" + second + second)
    assert len(truncate_events(events, step=99, records=2)) == 2
    assert events.read_bytes() == first + second
    assert len(truncate_events(events, step=1)) == 1  # a checkpoint without the count: by step
    assert events.read_bytes() == first


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    """Resuming from epoch-0002.pt left the abandoned part's best.pt, epoch-0003/4.pt and
    last.pt in place: the test scored that part's best, and a later --resume auto jumped
    back to it (the furthest along). They now move into an abandoned-after-step folder."""
    from traineval.runs.resume import find_checkpoint

    run = tmp_path / "run"
    TrainingManager(config(run, checkpoint_save_frequency=1)).train(dropout_mlp(0), *loaders(0))
    folder = run / "checkpoints"
    before = {p.name: load_checkpoint_file(p)["global_step"] for p in folder.glob("*.pt")}
    assert (before["epoch-0002.pt"], before["last.pt"]) == (14, 28)
    with caplog.at_level(logging.WARNING):
        TrainingManager(config(run, checkpoint_save_frequency=1, learning_rate=1e-12)).train(
            dropout_mlp(0), *loaders(0), resume_from=str(folder / "epoch-0002.pt")
        )
    [aside] = folder.glob("abandoned-after-step-14-*")
    moved = {p.name for p in aside.iterdir()}
    assert {name for name, step in before.items() if step > 14} <= moved
    assert "abandons the run's later part" in caplog.text
    for path in folder.glob("*.pt"):  # what stays: the resumed run's, or from before step 14
        payload = load_checkpoint_file(path)
        assert payload["global_step"] <= 14 or payload["config"]["learning_rate"] == 1e-12
    chosen, payload = find_checkpoint(run, "auto")
    assert chosen.name == "last.pt"
    assert payload["config"]["learning_rate"] == 1e-12


def test_a_resume_that_validates_at_other_steps_says_so(caplog):
    """eval_frequency decides what early stopping, a plateau schedule and best.pt see, so a
    change is named like a learning rate's; log_frequency changes only the logs."""
    from traineval.runs.resume import check_compatible

    saved = TrainingConfig().to_dict()
    current = {**saved, "eval_frequency": 50, "lr_scheduler_patience": 2, "log_frequency": 7}
    with caplog.at_level(logging.WARNING):
        check_compatible(saved, current, 1, 1)
    assert "eval_frequency was 500 in the checkpoint and is 50 now" in caplog.text
    assert "lr_scheduler_patience was 5 in the checkpoint and is 2 now" in caplog.text
    assert "log_frequency" not in caplog.text
