"""Sharded checkpoints written in the background (`async_checkpointing` where checkpoints
are sharded): every rank pauses only to copy its part of the model and the optimizer into
host buffers, reused from save to save (pinned where a GPU is); a thread then writes the
copy into a new shard folder through a process group of its own (its collectives never
interleave with training's), and on rank 0, once every rank's file and the metadata are on
disk, `best.safetensors` (from the folder) and the checkpoint file naming the folder.

The promises of the full checkpoints' writer (`traineval.runs.checkpoint_writer`) hold:
until the new folder and the file naming it are on disk the previous file names the
previous folder, so a kill at any moment leaves a loadable checkpoint (a killed save's
folder is removed when the next run claims the directory); at most one write is in flight
(a save waits for the previous one on every rank before it copies); a write that fails on
any rank (rank 0's files included) is raised on every rank at the next save or at the end,
its folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

from ..system.distributed import CollectiveError, Distributed, local_part, side_group
from ..system.files import WriteError
from .checkpoint import save_checkpoint_file
from .checkpoint_writer import CheckpointWriter, Write, perform_write
from .shard_folders import remove_older
from .sharded import write_shards


class ShardWriter(CheckpointWriter):
    """Every rank's writer of sharded checkpoints in the background (see the module). Its
    writes: "shards" (a staged state into a new folder, on every rank), then on rank 0
    "files" (`finish_save`; `value`: the folder, the checkpoint's dict and the tied names
    `best.safetensors` leaves out, None for no export). Each write ends with the ranks
    agreeing on how it went, so a failure on one rank is raised on every rank."""

    def __init__(self, job: Distributed, timeout_seconds: float) -> None:
        super().__init__(perform=self._perform)
        self.job = job
        self.group = side_group(job, timeout_seconds)  # a collective: every rank makes it
        self._layout: Any = None
        self._host: dict[str, Any] | None = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` copied into this rank's host buffers (after `wait()`: no write reads
        them); each DTensor's local part is copied, no rank gathers anything."""
        layout = _layout(state)
        if self._host is None or layout != self._layout:
            self._host = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
            self._layout = layout
        return _copy_state_dict(state, self._host, type_check=False)

    def close(self) -> None:
        """Wait for the last write, then let its process group go."""
        try:
            super().close()
        finally:
            if self.group is not None:
                with contextlib.suppress(Exception):  # a job torn down already
                    dist.destroy_process_group(self.group)
                self.group = None

    def _write(self, writes: Sequence[Write]) -> None:
        error: BaseException | None = None
        try:
            for write in writes:
                self.perform(write)
        except BaseException as failed:  # raised in the training thread by wait()
            error = failed
        try:
            self._error = agreed(error, self.job, self.group)
        except CollectiveError as lost:  # the ranks cannot agree: each says what it knows
            self._error = error or lost

    def _perform(self, write: Write) -> None:
        if write.kind == "shards":
            write_shards(write.path, write.value, self.job, self.group)
        elif write.kind == "files":
            shards, payload, skip = write.value
            finish_save(shards, write.path, payload, skip)
        else:  # a one-process save the write budget put off ("call")
            perform_write(write)


def finish_save(shards: Path, path: Path, payload: dict[str, Any], skip: set[str] | None) -> None:
    """Rank 0, once every rank's part is in `shards`: `best.safetensors` from the folder
    (unless `skip` is None; leaving out the tied names in it), then `path`, naming the
    folder; then the older folders of its name go. A failure before `path` is replaced
    removes the new folder (no file names it)."""
    from .shard_export import export_safetensors

    try:
        if skip is not None:
            export_safetensors(shards, path.with_suffix(".safetensors"), skip)
        save_checkpoint_file(payload, path)
    except BaseException:
        shutil.rmtree(shards, ignore_errors=True)
        raise
    remove_older(path.parent, path.stem, keep=shards.name)


def agreed(
    error: BaseException | None,
    job: Distributed,
    group: Any = None,
    said_as: Callable[[str], BaseException] = lambda text: WriteError(errno.EIO, text),
) -> BaseException | None:
    """How a step of a save went, the same on every rank: the first failing rank's error
    (that rank's own; on the others `said_as` its sentence: a `WriteError`), else None. A
    collective over `group` (a `CollectiveError` where the ranks cannot agree: one is
    gone)."""
    said = job.gather(None if error is None else str(error), group)
    first = next((text for text in said if text is not None), None)
    if first is None:
        return None
    return error if error is not None and str(error) == first else said_as(first)


def _layout(value: Any) -> Any:
    """What the host buffers of a state must match: its structure, and each tensor's type,
    shape (a DTensor's local shape too) and dtype."""
    if isinstance(value, torch.Tensor):
        return type(value), tuple(value.shape), tuple(local_part(value).shape), value.dtype
    if isinstance(value, dict):
        return tuple((key, _layout(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return type(value), tuple(_layout(item) for item in value)
    return type(value)
