"""What the checkpoint writer process writes, planned where torch is.

A plan is a file as records: a checkpoint's (`checkpoint_plan`: `data.pkl` made by torch's
own pickler, then each storage) or a safetensors file's (`safetensors_plan`: its header,
then each tensor). A record whose bytes lie in the writer's shared memory is named by its
place there (`Place`: a pointer and a length to an offset, None elsewhere); any other is
carried as bytes. The writer process turns plans into files without torch
(`runs.torch_zip`, `runs.write_worker`).
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import secrets
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import torch
import torch.serialization

from .torch_zip import Source

Place = Callable[[int, int], int | None]  # (pointer, nbytes) -> offset in the shared memory


class _Records:
    """Stands in for torch's zip writer under `torch.serialization._save`: keeps each record
    as its place in the shared memory, or as bytes."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.records: list[tuple[str, Source]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes):
            self.records.append((name, data[:nbytes]))
            return
        offset = self.place(data.data_ptr(), nbytes) if nbytes else None
        self.records.append((name, (offset, nbytes) if offset is not None else _bytes(data)))


def _bytes(storage: torch.UntypedStorage) -> bytes:
    """A CPU storage's bytes (a record that is not in the shared memory)."""
    return _tensor_bytes(torch.empty(0, dtype=torch.uint8).set_(storage))


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's values, in order, as a view of its bytes (any dtype, bf16 and bool
    too; a copy only where the tensor is not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's values as bytes, in order."""
    return tensor_view(tensor).tobytes()


def checkpoint_plan(payload: Any, place: Place) -> dict[str, Any]:
    """`payload` as `torch.save` would write it: the records and the archive's options
    (`runs.torch_zip.write_archive`). Only CPU tensors (the writer's copies)."""
    from torch.utils.serialization import config

    records = _Records(place)
    torch.serialization._save(payload, records, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    closing = _closing_records()
    digits = len(closing[-1][1])
    identity = str(secrets.randbelow(10**digits)).zfill(digits).encode()
    closing = [(name, identity if name.endswith("serialization_id") else data)
               for name, data in closing]  # fmt: skip
    return {
        "records": records.records + closing,
        "options": {
            "alignment": int(config.save.storage_alignment),
            "checksums": bool(config.save.compute_crc32),
        },
    }


@functools.cache
def _closing_records() -> list[tuple[str, bytes]]:
    """The records `torch.save`'s writer adds after the storages (`version` and
    `.data/serialization_id` in torch 2.x), read from a save of an empty dict."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        names = [info.filename.split("/", 1)[1] for info in archive.infolist()]
        last = max(i for i, name in enumerate(names) if name == "byteorder")
        return [(name, archive.read(f"archive/{name}")) for name in names[last + 1 :]]


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip


@functools.cache
def stored_dtypes() -> dict[torch.dtype, str]:
    """The dtypes a safetensors file holds, with their codes: `SAFETENSORS_DTYPES`, and
    complex64 where the installed safetensors stores it (newer versions), so a file written
    here is one its reader can read."""
    from safetensors.torch import save

    try:
        save({"z": torch.zeros(1, dtype=torch.complex64)})
    except (KeyError, ValueError, TypeError):
        return SAFETENSORS_DTYPES
    return {**SAFETENSORS_DTYPES, torch.complex64: "C64"}


Spec = tuple[torch.dtype, tuple[int, ...]]  # a tensor's dtype and shape


def safetensors_layout(specs: dict[str, Spec]) -> tuple[bytes, list[str]]:
    """A safetensors file's header (its length first) for tensors of these dtypes and
    shapes, and the order their bytes follow it in: the widest element types first, then
    by name (the library orders equal widths by dtype first: its bytes then differ from
    these, the tensors it loads do not). A dtype safetensors cannot store is refused."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    order = sorted(specs, key=lambda name: (-specs[name][0].itemsize, name))
    start = 0
    for name in order:
        dtype, shape = specs[name]
        if dtype not in stored_dtypes():
            raise ValueError(
                f"safetensors cannot store {name!r} of dtype {dtype}; it stores "
                f"{', '.join(sorted(stored_dtypes().values()))}"
            )
        end = start + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": stored_dtypes()[dtype], "shape": list(shape),
                        "data_offsets": [start, end]}  # fmt: skip
        start = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def safetensors_plan(tensors: dict[str, torch.Tensor], place: Place) -> list[Source]:
    """A safetensors file of `tensors` (CPU), as its parts: the header, then each tensor's
    bytes (`safetensors_layout`)."""
    header, order = safetensors_layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    parts: list[Source] = [header]
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        offset = place(tensor.data_ptr(), nbytes) if nbytes and tensor.is_contiguous() else None
        if offset is not None:
            parts.append((offset, nbytes))
        elif nbytes:
            parts.append(_tensor_bytes(tensor))
    return parts
