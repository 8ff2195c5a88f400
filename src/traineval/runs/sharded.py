"""Sharded checkpoints: under FSDP each rank writes its own part of the model and the
optimizer (`torch.distributed.checkpoint`), and the parts load on any number of ranks, or
whole into one process (`evaluate`, `predict`, `load_checkpoint`).

A sharded checkpoint is two things side by side in a run's `checkpoints/` folder:
`{name}.pt`, the usual checkpoint file (counters, config, random streams, schedule, ...)
without the model's and the optimizer's tensors, which names its shard folder under
`shards`; and that folder, `{name}.shards-<id>/`, as torch.distributed.checkpoint writes it
(a `.distcp` file per rank and the `.metadata` saying which piece of which tensor each one
holds). A save writes a new folder beside the old one, then replaces `{name}.pt`
atomically, then removes the older folders of that name: a crash at any point leaves the
previous `{name}.pt` whole, with its folder.

Nothing here unpickles arbitrary objects: `.metadata` is read and checked by
`traineval.runs.shard_metadata` when a reader is made, and every entry of a shard file is
read with `weights_only` (its tensors and its other entries alike). This module imports
torch.distributed.checkpoint (a second to import): the rest of the library imports it only
where a checkpoint is sharded.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

from ..system.distributed import is_sharded, no_initializing_step, reshard
from ..system.files import sync_folder, writing
from .errors import CheckpointError
from .shard_folders import MARK, SHARDED_PARTS, folder_name
from .shard_metadata import read_metadata

if TYPE_CHECKING:
    from ..system.distributed import Distributed


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's part of the model and the optimizer (DTensors; the optimizer's state by
    parameter name), as the shard folder holds it. No collective."""
    reshard(model)  # an evaluation pass leaves the root unit's parameters gathered
    with no_initializing_step(optimizer):
        weights, optimizer_state = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optimizer_state}


def new_folder(folder: Path, name: str, job: Distributed) -> Path:
    """Every rank: the path of a new shard folder of checkpoint `name` in `folder`, the
    same on every rank (a collective)."""
    token = job.gather(secrets.token_hex(4))[0]  # rank 0's, so every rank writes to one
    return folder / folder_name(name, token)


def write_shards(shards: Path, state: dict[str, Any], job: Distributed, group: Any = None) -> None:
    """Every rank: write `state` (`sharded_state`) into the new shard folder `shards`
    (`new_folder`), through process group `group` (None: the default one). A collective:
    after it, every rank's file and the metadata are on disk, synced with their folder. A
    write that fails on any rank is a `WriteError` on every rank, the new folder removed
    (the checkpoint file still names the previous one)."""
    folder, name = shards.parent, shards.name.partition(MARK)[0]
    writer = dcp.FileSystemWriter(shards, sync_files=True)
    try:
        with writing(folder / f"{name}.pt", (CheckpointException,)):
            try:  # torch's `dcp.save` less its one-process warning (not for a thread to hide)
                _save_state_dict(state, writer, process_group=group, no_dist=not job.enabled)
            except CheckpointException as error:  # a BaseException: said as its first cause
                raise _first_cause(error) from None
    except BaseException:
        shutil.rmtree(shards, ignore_errors=True)
        raise
    if job.is_main:
        sync_folder(shards)
        sync_folder(folder)


def _first_cause(error: CheckpointException) -> BaseException:
    """The first rank's error inside torch's `CheckpointException` (a full disk's OSError)."""
    for failure in error.failures.values():
        if isinstance(failure, tuple) and isinstance(failure[0], Exception):
            return failure[0]
    return error


def read_whole(shards: Path) -> dict[str, Any]:
    """The model and the optimizer of a shard folder, every tensor whole, in this process
    (no process group takes part): what a single process needs to evaluate or predict."""
    state: dict[str, Any] = {}
    with _unreadable_as_checkpoint_error(shards):
        reader = SafeReader(shards)
        # only the model and the optimizer (not, say, a callback's copy of the best weights)
        keys = set(SHARDED_PARTS) if reader.checked.planner_data is not None else None
        _load_state_dict(
            state, storage_reader=reader, planner=_WholeLoadPlanner(keys), no_dist=True
        )
    whole = {part: state.get(part, {}) for part in SHARDED_PARTS}
    if not all(isinstance(part, dict) for part in whole.values()):
        raise CheckpointError(f"the shard folder {str(shards)!r} holds no model state dict")
    whole["optimizer"].setdefault("state", {})  # a stateless optimizer saves no entry
    return whole


def load_into(
    shards: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    part: str = "model",
) -> None:
    """Load a shard folder into `model` (and `optimizer`), sharded or not, in one process or
    on every rank of a job (then a collective; each rank reads the pieces of its shards, on
    any number of ranks). A model no process group shards loads in this process alone.
    `part`: the weights to load ("training_weights": the trained weights of a run that
    keeps their moving average as its "model")."""
    reshard(model)
    alone = reads_alone(model)
    reader = SafeReader(shards)  # the metadata, read and checked once
    if optimizer is None:
        state: dict[str, Any] = {part: get_model_state_dict(model)}
        read_into(reader, state, alone)
        set_model_state_dict(model, state[part])
        return
    with no_initializing_step(optimizer):  # the saved entries make the template instead
        weights, optimizer_state = get_state_dict(model, optimizer)
        state = {part: weights, "optimizer": optimizer_state}
        _make_room(optimizer_state, reader.checked, dict(model.named_parameters()))
        read_into(reader, state, alone)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state)


def reads_alone(model: torch.nn.Module) -> bool:
    """Whether this process reads a shard folder for `model` alone: unless a process group
    shards it (then every rank reads its part, together)."""
    return not (torch.distributed.is_initialized() and is_sharded(model))


def read_into(reader: SafeReader, state: dict[str, Any], alone: bool) -> None:
    """Fill the places of `state` (a template: what to read, shaped and sharded as this
    rank keeps it) from a shard folder; every rank of the job together unless `alone`."""
    with _unreadable_as_checkpoint_error(Path(reader.path)):  # torch's `dcp.load` less its
        # one-process warning (a writer thread may read: its filters are not a thread's own)
        _load_state_dict(state, storage_reader=reader, planner=_LoadPlanner(), no_dist=alone)


def _make_room(
    optimizer_state: dict[str, Any], metadata: Metadata, params: dict[str, torch.nn.Parameter]
) -> None:
    """Give a fresh optimizer's state dict a place for every entry the folder holds: its
    state is empty until a step (`no_initializing_step`: none is taken to make it) and its
    groups lack what a schedule adds (`initial_lr`), and a load fills only the places it
    finds. A moment shaped like its parameter is sharded like it."""
    groups, state = optimizer_state["param_groups"], optimizer_state.setdefault("state", {})
    for key, entry in metadata.state_dict_metadata.items():
        group = _group_entry(key)
        if group is not None and group[0] < len(groups):
            groups[group[0]].setdefault(group[1], None)
        elif key.startswith("optimizer.state."):
            name, _, item = key.removeprefix("optimizer.state.").rpartition(".")
            if name in params and item not in state.get(name, {}):
                state.setdefault(name, {})[item] = _place_for(entry, params[name])


def _place_for(entry: Any, param: torch.nn.Parameter) -> Any:
    """An empty place for a saved optimizer entry of `param`: a tensor of its shape and
    dtype (sharded like `param` when shaped like it), or None for a plain value."""
    if not isinstance(entry, TensorStorageMetadata):
        return None
    dtype = entry.properties.dtype
    if tuple(entry.size) == tuple(param.shape):
        return torch.zeros_like(param.detach(), dtype=dtype)
    return torch.zeros(entry.size, dtype=dtype, device=param.device)


def _group_entry(key: str) -> tuple[int, str] | None:
    """(group, entry) of a folder's key `optimizer.param_groups.<group>.<entry>`, else None."""
    parts = key.split(".")
    if len(parts) != 4 or parts[:2] != ["optimizer", "param_groups"] or not parts[2].isdigit():
        return None
    return int(parts[2]), parts[3]


@contextlib.contextmanager
def _unreadable_as_checkpoint_error(shards: Path) -> Iterator[None]:
    """Say a shard folder that cannot be read (torch's `CheckpointException`, a missing or
    truncated file, a tensor another model does not have) as a `CheckpointError` naming it."""
    try:
        yield
    except (CheckpointError, torch.distributed.DistError):
        raise  # a collective that failed or timed out says so itself
    except (
        CheckpointException,
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
    ) as error:
        said = str(error).strip().splitlines() or [type(error).__name__]
        raise CheckpointError(
            f"the shard folder {str(shards)!r} is truncated, corrupt or of another model "
            f"({said[-1][:300]})"
        ) from None


def _load_bytes(planner: DefaultLoadPlanner, item: ReadItem, value: io.BytesIO) -> None:
    """A non-tensor entry (an optimizer's hyperparameters), read with `weights_only` where
    torch's planner unpickles it without restriction."""
    loaded = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn], loaded)
    else:
        planner.state_dict[item.dest_index.fqn] = loaded


class _LoadPlanner(DefaultLoadPlanner):
    """torch's load planner, reading non-tensor entries with `_load_bytes`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


class _WholeLoadPlanner(_EmptyStateDictLoadPlanner):
    """torch's planner that loads a whole folder, reading non-tensor entries with `_load_bytes`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


class SafeReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's file reader over a folder whose metadata
    `read_metadata` read and checked when the reader was made (torch's own reader
    unpickles it without restriction, and on failure falls back to other files)."""

    def __init__(self, shards: Path) -> None:
        super().__init__(shards)
        self.checked = read_metadata(shards)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self.checked
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
