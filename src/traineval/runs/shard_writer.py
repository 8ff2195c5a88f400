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
any rank is raised on every rank at the next save or at the end, its folder removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

from ..system.distributed import Distributed, local_part, side_group
from .checkpoint import save_checkpoint_file
from .checkpoint_writer import CheckpointWriter, Write
from .shard_folders import SHARDS, remove_older
from .sharded import write_shards


class ShardWriter(CheckpointWriter):
    """Every rank's writer of sharded checkpoints in the background (see the module). Its
    writes: "shards" (a staged state into a new folder, on every rank), then on rank 0
    "shard-export" (`value`: the folder and the tied names to leave out) and "checkpoint"
    (the file naming the folder; the older folders of its name are removed after it)."""

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

    def _perform(self, write: Write) -> None:
        if write.kind == "shards":
            write_shards(write.path, write.value, self.job, self.group)
        elif write.kind == "shard-export":
            from .shard_export import export_safetensors

            shards, skip = write.value
            export_safetensors(shards, write.path, skip)
        else:
            save_checkpoint_file(write.value, write.path)
            remove_older(write.path.parent, write.path.stem, keep=write.value[SHARDS])


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
