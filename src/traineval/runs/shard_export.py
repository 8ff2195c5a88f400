"""A shard folder's model weights as one safetensors file (`best.safetensors` beside a
sharded `best.pt`), written from the folder a batch of tensors at a time: no rank gathers
the model, and the process writing holds at most `BATCH_BYTES` of it (or its largest
tensor) at once.

The file is the one `save_safetensors` writes for the model: every tensor whole under its
plain name, tied weights once (the names in `skip`), `format: pt` metadata. A non-tensor
entry of the model's state (a module's `get_extra_state`) has no place in safetensors and
is left out, as the library leaves it out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..system.files import atomic_file
from .file_plans import Spec, safetensors_layout, tensor_view
from .sharded import SafeReader, read_into

BATCH_BYTES = 256 * 2**20  # the tensors read from the folder at once, at most (or one)


def export_safetensors(
    shards: Path, path: Path, skip: Collection[str] = (), batch_bytes: int = BATCH_BYTES
) -> Path:
    """Write the model weights of shard folder `shards` to `path` (safetensors,
    atomically), reading at most `batch_bytes` of tensors at a time; leave out the names in
    `skip` (a tied weight's second name). In this process alone: no collective."""
    reader = SafeReader(shards)
    specs = _model_specs(reader, skip)
    header, order = safetensors_layout(specs)
    with atomic_file(path, (CheckpointException,)) as temporary, temporary.open("wb") as handle:
        handle.write(header)
        for batch in _batches(order, specs, batch_bytes):
            state = {"model": {n: torch.empty(specs[n][1], dtype=specs[n][0]) for n in batch}}
            read_into(reader, state, alone=True)
            for name in batch:
                handle.write(tensor_view(state["model"][name]))
    return path


def _model_specs(reader: SafeReader, skip: Collection[str]) -> dict[str, Spec]:
    """Dtype and shape of each model tensor in the folder, by its name in the model."""
    specs: dict[str, Spec] = {}
    for key, entry in reader.checked.state_dict_metadata.items():
        name = key.removeprefix("model.")
        if name != key and name not in skip and isinstance(entry, TensorStorageMetadata):
            specs[name] = (entry.properties.dtype, tuple(entry.size))
    return specs


def _batches(order: list[str], specs: dict[str, Spec], limit: int) -> Iterator[list[str]]:
    """`order` cut into runs of tensors of at most `limit` bytes together (a larger tensor
    alone), in order."""
    batch: list[str] = []
    held = 0
    for name in order:
        dtype, shape = specs[name]
        size = dtype.itemsize * math.prod(shape)
        if batch and held + size > limit:
            yield batch
            batch, held = [], 0
        batch.append(name)
        held += size
    if batch:
        yield batch


def tied_names(model: torch.nn.Module) -> set[str]:
    """The names under which `model` holds a parameter or buffer it also holds under an
    earlier name (the file keeps the first; `load_safetensors` ties them again)."""
    seen: set[int] = set()
    tied: set[str] = set()
    named = itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied
