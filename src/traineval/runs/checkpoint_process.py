"""Checkpoint writes in a process of their own: serialisation and disk off the training
process, neither holding its GIL nor, where another core is free, its core.

Training copies the state into an arena of shared memory (an anonymous `memfd`, handed to
the writer process when it starts, so nothing is left behind when either process dies) and
plans each file (`runs.file_plans`: a checkpoint as `torch.save`'s records, pickled by
torch's own pickler; a safetensors file as its header and tensors), each tensor named by its
offset in the arena. The writer process (`runs.write_worker`) maps the same memory and
writes the files as a synchronous save would (temp file, fsync, rename: a kill -9 at any
moment leaves the previous file loadable); it never imports torch. One job at a time, as
for the writer thread (`checkpoint_writer`): the training process waits for the job in
flight before it copies the next state into the arena, and the run ends only after the
last file is on disk. The arena's first bytes are a control word: the number of a job to
stop (`ProcessWriter.supersede`: a save of the same file and update replaces the write in
flight). Linux only (`os.memfd_create`); elsewhere the writer thread does the work.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import select
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from ..system.containers import sequence_like
from ..system.files import WriteError
from .checkpoint_writer import CheckpointWriteError, CheckpointWriter, Write
from .file_plans import checkpoint_plan, safetensors_plan
from .write_worker import HEADER as _HEADER
from .write_worker import JOB as _JOB
from .write_worker import STOPPED

ALIGN = 64  # bytes: each tensor starts on a cache line
CONTROL = ALIGN  # the arena's first bytes hold the control word; the copies follow


def available() -> bool:
    """Whether this platform can run the writer process (anonymous shared memory)."""
    return hasattr(os, "memfd_create") and sys.platform.startswith("linux")


class Arena:
    """Shared memory the state is copied into, grown by doubling; a tensor copied into it
    is a plain CPU tensor over the mapping (the writer maps the same bytes)."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.fd = os.memfd_create("traineval-checkpoint", os.MFD_CLOEXEC)
        self.size = 0
        self.used = CONTROL
        self.maps: list[tuple[int, int, mmap.mmap]] = []  # (address, length, mapping)
        self._grow(size)

    def _grow(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        populate = getattr(mmap, "MAP_POPULATE", 0)  # the pages now, in one go, not by faults
        mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | populate)
        address = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
        self.maps.append((address, size, mapping))
        self.size = size

    def reserve(self, nbytes: int) -> None:
        """Make room for `nbytes` more in one mapping (a snapshot's size, before it copies:
        one mapping whose pages the next snapshots reuse)."""
        needed = self.used + nbytes + ALIGN * 1024
        if needed > self.size:
            self._grow(max(needed, 2 * self.size))

    def reset(self) -> None:
        """Every earlier copy is written: the arena is free again (its pages stay mapped)."""
        self.used = CONTROL
        self.maps = self.maps[-1:]  # older mappings go once their tensors do

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s values in the arena (contiguous), as a CPU tensor over it."""
        nbytes = tensor.numel() * tensor.element_size()
        start = -(-self.used // ALIGN) * ALIGN
        if start + nbytes > self.size:
            self._grow(max(2 * self.size, start + nbytes + (1 << 20)))
        self.used = start + nbytes
        mapping = self.maps[-1][2]
        count = tensor.numel()
        view = torch.frombuffer(mapping, dtype=tensor.dtype, count=count, offset=start)
        if _dense(tensor):  # its layout kept (transposed, channels_last), as torch.save does
            view = view.as_strided(tensor.shape, tensor.stride())
        else:
            view = view.view(tensor.shape)
        view.copy_(tensor.detach())
        return view

    def stop(self, job: int) -> None:
        """Ask the writer to stop job number `job` (the control word, before the copies)."""
        _JOB.pack_into(self.maps[-1][2], 0, job)

    def place(self, pointer: int, nbytes: int) -> int | None:
        """The offset in the arena of the `nbytes` at `pointer` (None: not the arena's)."""
        for address, length, _ in self.maps:
            if address <= pointer and pointer + nbytes <= address + length:
                return pointer - address
        return None

    def close(self) -> None:
        self.maps = []
        os.close(self.fd)


class ProcessWriter(CheckpointWriter):
    """The writer thread's interface (`snapshot`, `submit`, `wait`), with the writes done
    by a process of its own (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena()
        self._process: subprocess.Popen[bytes] | None = None
        self._jobs: Any = None
        self._replies: Any = None
        self._pending = False
        self._job = 0  # the number of the last job submitted (the first is 1)
        self._flight: tuple[str, int | None] = ("", None)  # its file and update
        self.superseded = 0  # jobs stopped because a save of the same state replaced them
        self._start()  # now: it imports torch while training starts, not at the first save

    def snapshot(self, kind: str, value: Any) -> Any:
        """A copy of `value` in the arena, tensors by view once (ties stay ties)."""
        self.arena.reserve(_nbytes(value))
        return _into(value, self.arena)

    def submit(self, writes: Sequence[Write], what: str, step: int | None = None) -> None:
        """Hand `writes` to the writer process (it starts on the first job)."""
        self.wait()
        self._what, self._flight = what, (what, step)
        self._job += 1
        jobs = [self._planned(write) for write in writes]  # may copy into the arena: first
        job = {"size": self.arena.size, "writes": jobs, "what": what, "job": self._job}
        message = pickle.dumps(job)
        self._start()
        try:
            self._jobs.write(_HEADER.pack(len(message)) + message)
            self._jobs.flush()
        except OSError as error:
            self._stopped(f"the checkpoint writer process is gone ({error})")
        self._pending = True

    def _planned(self, write: Write) -> tuple[str, str, Any]:
        """`write` as the writer process takes it: a format, the path, the plan."""
        value = _in_arena(write.value, self.arena)
        if write.kind == "safetensors":
            return "bytes", str(write.path), safetensors_plan(value, self.arena.place)
        return "torch", str(write.path), checkpoint_plan(value, self.arena.place)

    def wait(self) -> None:
        """Block until the job in flight is on disk; raise its error, if any."""
        if self._pending:
            ok, message = self._reply()
            self._pending = False
            self.arena.reset()  # the writer has read every copy of the job
            if ok:
                self.superseded += message == STOPPED
                return
            if isinstance(message, tuple):  # a WriteError: the file and the disk, said
                raise WriteError(*message)
            raise CheckpointWriteError(f"writing {self._what} failed: {message}")

    @property
    def busy(self) -> bool:
        """Whether a job is still being written (its reply has not come)."""
        if not self._pending:
            return False
        ready, _, _ = select.select([self._replies], [], [], 0)
        return not ready

    def supersede(self, what: str, step: int) -> bool:
        """Stop the write in flight when it is of `what` at update `step`: the save about to
        be made replaces it (a periodic save at an epoch's last update, then the epoch's
        own) and need not wait for it (most of a write's time is its fsync, which a stop
        skips too). Only a save of the same update stops one, so every saved update's state
        is written and writes that fall behind still wait; a kill before the new one lands
        resumes from the file before (exactly). Returns whether it asked for a stop."""
        if not self._pending or self._flight != (what, step):
            return False
        self.arena.stop(self._job)
        return True

    def close(self) -> None:
        """Wait for the last job, then let the writer process exit."""
        try:
            self.wait()
        finally:
            process, self._process = self._process, None
            if process is not None:
                # An explicit stop, not EOF alone: a process forked meanwhile (a DataLoader
                # worker) holds a copy of the pipe's end, and the writer would wait for it.
                with contextlib.suppress(OSError):
                    self._jobs.write(_HEADER.pack(0))
                    self._jobs.flush()
                self._jobs.close()
                try:
                    process.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    process.kill()
                self._replies.close()
            self.arena.close()

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        jobs_read, jobs_write = os.pipe()
        replies_read, replies_write = os.pipe()
        fds = (self.arena.fd, jobs_read, replies_write)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "traineval.runs.write_worker",
                *map(str, fds),
                str(os.getpid()),
            ],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        os.close(jobs_read)
        os.close(replies_write)
        self._jobs = os.fdopen(jobs_write, "wb")
        self._replies = os.fdopen(replies_read, "rb")

    def _reply(self) -> tuple[bool, Any]:
        header = self._replies.read(_HEADER.size)
        if len(header) < _HEADER.size:
            self._stopped("the checkpoint writer process ended without writing it")
        reply: tuple[bool, Any] = pickle.loads(self._replies.read(_HEADER.unpack(header)[0]))
        return reply

    def _stopped(self, why: str) -> NoReturn:
        """The writer process is gone: end it for good (the next job starts another)."""
        self._pending = False
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
        for pipe in (self._jobs, self._replies):
            with contextlib.suppress(OSError):
                pipe.close()
        raise CheckpointWriteError(f"writing {self._what} failed: {why}")


def _mapped(value: Any, leaf: Callable[[Any], Any], kind: type | tuple[type, ...]) -> Any:
    """`value` (nested dicts, lists and tuples) with each item of `kind` replaced by
    `leaf(item)`."""
    if isinstance(value, kind):
        return leaf(value)
    if isinstance(value, dict):
        return {k: _mapped(v, leaf, kind) for k, v in value.items()}
    if isinstance(value, list):
        return [_mapped(v, leaf, kind) for v in value]
    if isinstance(value, tuple):
        items = [_mapped(v, leaf, kind) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value  # nothing replaced: the tuple as it is (torch.Size)
        return sequence_like(value, items)
    return value


def _shares_bytes(tensor: torch.Tensor) -> bool:
    """Whether `tensor` has bytes to place in the arena (else it travels pickled)."""
    return (
        tensor.layout == torch.strided
        and not tensor.is_meta
        and not tensor.is_quantized  # its bytes and its quantizer go through torch's pickler
        and tensor.numel() > 0
    )


def _dense(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s elements fill `numel` places without gaps or overlaps, in some
    order of its dimensions (contiguous, transposed, channels_last): a copy keeps its
    strides."""
    sizes_strides = sorted(
        (stride, size)
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
        if size != 1
    )
    expected = 1
    for stride, size in sizes_strides:
        if stride != expected:
            return False
        expected *= size
    return True


def _view(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What tells one view of a storage from another (two names of one view copy once)."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tensor.shape, tensor.stride(), tensor.dtype,
            tensor.is_conj(), tensor.is_neg())  # fmt: skip


def _nbytes(value: Any) -> int:
    """The bytes `_into` will copy (each view once, with its alignment)."""
    views: dict[tuple[Any, ...], int] = {}

    def count(tensor: torch.Tensor) -> None:
        if _shares_bytes(tensor):
            views[_view(tensor)] = tensor.numel() * tensor.element_size() + ALIGN

    _mapped(value, count, torch.Tensor)
    return sum(views.values())


def _into(value: Any, arena: Arena) -> Any:
    """`value` with every strided tensor copied into `arena` (a view shared by two names is
    copied once, and both names get the one copy)."""
    seen: dict[tuple[Any, ...], torch.Tensor] = {}

    def copied(tensor: torch.Tensor) -> torch.Tensor:
        if not _shares_bytes(tensor):
            return tensor.detach().cpu().clone()  # travels pickled (no bytes to share)
        key = _view(tensor)
        if key not in seen:
            seen[key] = arena.copy(tensor)
        return seen[key]

    return _mapped(value, copied, torch.Tensor)


def _in_arena(value: Any, arena: Arena) -> Any:
    """`value` with every tensor that has bytes in the arena (a put-off save's own copy is
    copied in first; a tensor without strided bytes stays as it is: its plan carries it)."""
    placed: dict[int, torch.Tensor] = {}

    def inside(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in placed:
            placed[id(tensor)] = tensor
            if _shares_bytes(tensor):
                storage = tensor.untyped_storage()
                if arena.place(storage.data_ptr(), storage.nbytes()) is None:
                    placed[id(tensor)] = arena.copy(tensor)
        return placed[id(tensor)]

    return _mapped(value, inside, torch.Tensor)
