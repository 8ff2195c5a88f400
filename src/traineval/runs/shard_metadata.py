"""A shard folder's `.metadata`, read as a stranger's file: unpickled by an unpickler that
admits only torch.distributed.checkpoint's record classes, sizes and dtypes (torch's own
reader unpickles it without restriction), then checked before anything acts on it: every
file it names is a regular file inside the folder, long enough for the bytes named in it;
every tensor's size is non-negative and no larger than the folder's data; every path of
the loaded structure is short. A folder that fails is a `CheckpointError` naming it, with
nothing in it run and nothing allocated for it.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import os
import pickle
import stat
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from .errors import CheckpointError

RECORD_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits torch.distributed.checkpoint's record classes (dataclasses, enums), torch's
    sizes, dtypes and layouts, and POSIX paths; anything else is refused before it is built."""

    def find_class(self, module: str, name: str) -> Any:
        if _admitted(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the shard metadata refers to {module}.{name}")


def _admitted(module: str, name: str) -> bool:
    """Whether `_MetadataUnpickler` may build `module.name`."""
    if module in RECORD_MODULES:
        found = getattr(sys.modules.get(module), name, None)
        return isinstance(found, type) and (
            dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)
        )
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name == "_get_layout"
    return module == "pathlib" and name in ("PosixPath", "PurePosixPath")


def read_metadata(shards: Path, filename: str = ".metadata") -> Metadata:
    """A shard folder's metadata, unpickled by `_MetadataUnpickler` and checked
    (`_problem`); a `CheckpointError` naming the folder otherwise."""
    if shards.is_symlink() or not shards.is_dir():
        raise CheckpointError(f"the shard folder {str(shards)!r} is not a folder (or is a link)")
    try:
        data = regular_file(shards, filename).read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as error:  # a stranger's bytes: any failure says the same
        raise CheckpointError(
            f"the shard folder {str(shards)!r} has unreadable or unsafe metadata "
            f"({type(error).__name__}: {str(error)[:200]}); nothing in it was run"
        ) from None
    problem = _problem(metadata, shards)
    if problem:
        raise CheckpointError(f"the shard folder {str(shards)!r} is unusable: {problem}")
    return metadata


def regular_file(shards: Path, name: str) -> Path:
    """`shards/name`, refused unless it is a regular file (not a link, a pipe, a folder)."""
    path = shards / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise CheckpointError(f"the shard folder {str(shards)!r} has no file {name!r}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"the shard folder {str(shards)!r} holds {name!r} as something other than a "
            "regular file (a link, a pipe or a folder)"
        )
    return path


def _problem(metadata: Any, shards: Path) -> str:
    """What makes `metadata` unusable for `shards`, or ''."""
    if not isinstance(metadata, Metadata):
        return f"its metadata is a {type(metadata).__name__}, not a metadata record"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "its metadata does not list its entries and their files"
    data_bytes, problem = _files_problem(storage, shards)
    return (
        problem
        or _entries_problem(entries, data_bytes)
        or _paths_problem(metadata.planner_data, len(entries))
    )


def _files_problem(storage: dict[Any, Any], shards: Path) -> tuple[int, str]:
    """The bytes of the data files `storage` names, and what is wrong with them, or ''."""
    sizes: dict[str, int] = {}
    for info in storage.values():
        if not isinstance(info, _StorageInfo):
            return 0, "an entry's file record is malformed"
        name, offset, length = info.relative_path, info.offset, info.length
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            return 0, f"it names a file outside the folder ({name!r})"
        if not _non_negative(offset, length):
            return 0, f"an entry of {name!r} has a negative or non-integer place"
        if not all(isinstance(d, str) for d in info.transform_descriptors or ()):
            return 0, f"an entry of {name!r} names its transforms with other than text"
        if name not in sizes:
            sizes[name] = regular_file(shards, name).stat().st_size
        if offset + length > sizes[name]:
            return (
                0,
                f"{name!r} is truncated ({sizes[name]} bytes, an entry ends at {offset + length})",
            )
    return sum(sizes.values()), ""


def _entries_problem(entries: dict[Any, Any], data_bytes: int) -> str:
    """What is wrong with the tensor entries (sizes, dtypes), or ''."""
    for key, entry in entries.items():
        if not isinstance(key, str):
            return "an entry's name is not text"
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            return f"the entry {key!r} is neither a tensor nor a value"
        dtype = getattr(entry.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not _shape(entry.size):
            return f"the tensor {key!r} has a malformed size or dtype"
        if math.prod(entry.size) * dtype.itemsize > data_bytes:
            return f"the tensor {key!r} {tuple(entry.size)} is larger than the folder's data"
    return ""


def _paths_problem(planner_data: Any, entries: int) -> str:
    """What is wrong with the places the entries load into, or '': each a short path of
    names and list indices (an index beyond the entry count would have a list padded out to
    it: memory a stranger's file could ask for)."""
    if planner_data is None:
        return ""
    if not isinstance(planner_data, dict):
        return "its metadata's load places are malformed"
    for path in planner_data.values():
        if not isinstance(path, tuple | list) or not all(
            isinstance(part, str) or (type(part) is int and 0 <= part < entries) for part in path
        ):
            return f"an entry loads into a malformed place ({str(path)[:80]})"
    return ""


def _shape(size: Any) -> bool:
    """Whether `size` is a torch.Size of non-negative dimensions."""
    return isinstance(size, torch.Size) and _non_negative(*size)


def _non_negative(*values: Any) -> bool:
    return all(type(v) is int and v >= 0 for v in values)


def shapes(shards: Path) -> dict[str, Any]:
    """The model's entries in a shard folder, tensors as empty tensors of their whole shapes
    (on the meta device) and other values (a module's extra state) as None: names and
    shapes to check a model against, nothing read but the metadata."""
    metadata = read_metadata(shards)
    places = metadata.planner_data or {}
    found: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        place = places.get(key, tuple(key.split(".", 1)))
        if len(place) < 2 or place[0] != "model":
            continue
        found[str(place[1])] = None  # a value, or a part of one (a module's extra state)
        if len(place) == 2 and isinstance(entry, TensorStorageMetadata):
            found[str(place[1])] = torch.empty(
                entry.size, dtype=entry.properties.dtype, device="meta"
            )
    return found
