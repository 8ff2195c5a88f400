"""Checkpoints written in the background: training pauses only to copy the state to host
memory (`snapshot`), a writer thread does the rest (`CheckpointWriter`).

The promises of a synchronous save hold: each file is written atomically (temp file, fsync,
rename), so a SIGKILL at any moment leaves the previous checkpoint loadable; at most one
write is in flight (a second save **waits** for the first to finish before it takes its
snapshot, so host memory holds at most one snapshot); the run does not end, report success
or raise its own error before the last write is on disk (`wait()`); and a write that fails
is raised as the run's error (`CheckpointWriteError`) at the next save or at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..system.containers import sequence_like
from ..system.files import WriteError


class CheckpointWriteError(RuntimeError):
    """A checkpoint written in the background could not be written."""


@dataclasses.dataclass
class Write:
    """One file of a save: a checkpoint (`kind` "checkpoint": `value` is its dict) or a
    weights export ("safetensors": `value` is the state dict), at `path`; or a save this
    module does not know how to write ("call": `value()` writes it; a sharded checkpoint
    put off by `StagedWrites`)."""

    kind: str
    path: Path
    value: Any


Perform = Callable[[Write], Any]


def snapshot(value: Any, reuse: Any = None) -> Any:
    """A copy of `value` that training cannot change any more: every tensor copied to host
    memory (CUDA tensors into pinned memory, then one synchronisation), the containers and
    plain values copied too (state dicts share their lists with the live objects).

    `reuse` (an earlier snapshot of the same structure, no longer being written) lends its
    tensors: copying into memory already mapped is several times faster than allocating
    (the first touch of fresh pages dominates a large copy).

    A tensor that appears more than once (one view under two names: tied weights, or the
    weights in both a checkpoint and its exported copy) is copied once, and the copies are
    one tensor too, so `untied` still sees the tie."""
    copies: list[bool] = []
    copied = _copy(value, reuse, _Copies(copies))
    if copies and torch.cuda.is_available():
        torch.cuda.synchronize()
    return copied


class _Copies(dict[tuple[Any, ...], torch.Tensor]):
    """One snapshot's tensor copies by the view they copy; `pinned` records device copies."""

    def __init__(self, pinned: list[bool]) -> None:
        super().__init__()
        self.pinned = pinned
        self.lent: set[int] = set()  # buffers of the earlier snapshot already written into


_PLAIN = (int, float, bool, str, bytes, type(None))  # immutable: shared by the copy


def _copy(value: Any, reuse: Any, copies: _Copies) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta:  # no storage to tell views by
            return _copy_tensor(value.detach(), None, copies.pinned)
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                value.shape, value.stride(), value.dtype,
                value.is_conj(), value.is_neg())  # fmt: skip
        if view not in copies:
            if isinstance(reuse, torch.Tensor):  # a buffer shared in the earlier snapshot
                if id(reuse) in copies.lent:  # is lent once: no two copies in one tensor
                    reuse = None
                else:
                    copies.lent.add(id(reuse))
            copies[view] = _copy_tensor(value.detach(), reuse, copies.pinned)
        return copies[view]
    if isinstance(value, dict):
        if all(type(item) in _PLAIN for item in value.values()):  # e.g. the config
            return dict(value)
        lent = reuse if isinstance(reuse, dict) else {}
        return {key: _copy(item, lent.get(key), copies) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(item) in _PLAIN for item in value):  # e.g. Python's RNG state
            return list(value) if isinstance(value, list) else value
        same = isinstance(reuse, (list, tuple)) and len(reuse) == len(value)
        items = [_copy(item, reuse[i] if same else None, copies) for i, item in enumerate(value)]
        return sequence_like(value, items)
    return copy.deepcopy(value)


def _copy_tensor(value: torch.Tensor, reuse: Any, copies: list[bool]) -> torch.Tensor:
    fits = (
        isinstance(reuse, torch.Tensor)
        and reuse.shape == value.shape
        and reuse.dtype == value.dtype
        and reuse.layout == value.layout == torch.strided
        and reuse.is_contiguous()
    )
    if value.device.type == "cpu":
        return reuse.copy_(value) if fits else value.clone()
    out = reuse if fits else torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    out.copy_(value, non_blocking=True)
    copies.append(True)
    return out


class CheckpointWriter:
    """One background thread per save, at most one at a time (see the module); `perform`
    writes one file."""

    def __init__(self, perform: Perform | None = None) -> None:
        self.perform = perform or perform_write
        self.slow_said = False  # whether a save that waited for the previous one was said
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self.buffers: dict[str, Any] = {}  # the last snapshots, lent to the next ones

    def snapshot(self, kind: str, value: Any) -> Any:
        """`snapshot(value)` into the buffers of the last `kind` snapshot (after `wait()`:
        no write reads them any more)."""
        self.buffers[kind] = snapshot(value, self.buffers.get(kind))
        return self.buffers[kind]

    def submit(self, writes: Sequence[Write], what: str, step: int | None = None) -> None:
        """Write `writes` in order on a writer thread, after the previous save finished
        (`what`: the save's file, of the loop's update `step`)."""
        self.wait()
        self._what = what
        # not a daemon: an exception in the training thread still lets the write finish
        self._thread = threading.Thread(
            target=self._write, args=(writes,), name="traineval-checkpoint"
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, WriteError):
                raise error  # it names the file that failed (best.safetensors, not best.pt)
            raise CheckpointWriteError(f"writing {self._what} failed: {error}") from error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def supersede(self, what: str, step: int) -> bool:
        """A save of `what` at update `step` is about to be made: a write in flight of the
        same file and update may stop (the process writer's does), as the new one replaces
        it, so the save need not wait for it; whether one was asked to. The thread's write
        finishes."""
        return False

    def close(self) -> None:
        """Wait for the last write (a writer process also ends)."""
        self.wait()

    def _write(self, writes: Sequence[Write]) -> None:
        try:
            for write in writes:
                self.perform(write)
        except BaseException as error:  # raised in the training thread by wait()
            self._error = error


class StagedWrites(CheckpointWriter):
    """Saves put off (the loop's checkpoint-write budget): each is copied to host memory
    when requested, as for a background write, and kept until `write_all()`; a later save
    of the same file replaces the one kept. Used where a writer is, in the training thread."""

    def __init__(self, perform: Perform | None = None) -> None:
        super().__init__(perform)
        self.pending: dict[str, Sequence[Write]] = {}
        self.target: CheckpointWriter | None = None  # the run's background writer, if any

    def snapshot(self, kind: str, value: Any) -> Any:
        return snapshot(value)  # each kept save its own copy

    def submit(self, writes: Sequence[Write], what: str, step: int | None = None) -> None:
        self.pending[what] = writes

    def wait(self) -> None:
        pass

    def drop(self, name: str) -> None:
        """Forget the kept save of checkpoint `name` (a newer one is about to be written)."""
        for what in [w for w in self.pending if Path(w).stem == name]:
            del self.pending[what]

    def write_all(self) -> None:
        """Write every kept save, in the order they were made."""
        pending, self.pending = self.pending, {}
        for what, writes in pending.items():
            if self.target is not None:  # one write at a time: after the one in flight
                self.target.submit(writes, what)
                continue
            for write in writes:
                self.perform(write)


def perform_write(write: Write) -> None:
    """Write one file as a synchronous save does (atomically)."""
    from .checkpoint import save_checkpoint_file, save_safetensors

    if write.kind == "safetensors":
        save_safetensors(write.value, write.path)
    elif write.kind == "call":
        write.value()
    else:
        save_checkpoint_file(write.value, write.path)


class WriteBudget:
    """How much of a run's time its checkpoints may take: the copies kept for later and the
    file writes together stay within `share` of the time since the run began, so a run of
    many tiny epochs writes `last.pt` every few epochs instead of every one. The first write
    is always allowed, and so is one at least every `max_gap` seconds (a kill -9 loses at
    most that much), whatever the copies cost."""

    def __init__(self, share: float, max_gap: float = 120.0) -> None:
        self.share = share
        self.max_gap = max_gap
        self.started = self.last_write = time.perf_counter()
        self.spent = 0.0  # seconds of checkpoint work so far
        self.expected = 0.0  # seconds the next write is expected to take (the latest's)

    def allows(self) -> bool:
        """Whether a write now keeps the run within its share."""
        now = time.perf_counter()
        if now - self.last_write >= self.max_gap:
            return True
        return self.spent + self.expected <= self.share * (now - self.started)

    @contextlib.contextmanager
    def charge(self, *, write: bool) -> Iterator[None]:
        """Count the block's time as checkpoint work; a `write` also sets what the next is
        expected to cost (a copy kept for later does not)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.spent += ended - started
            if write:
                self.expected, self.last_write = ended - started, ended
