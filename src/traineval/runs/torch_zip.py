"""`torch.save`'s file format, written from bytes without torch.

A torch checkpoint is a zip archive of stored (uncompressed) records under one folder:
`data.pkl` (the pickled object, each tensor's storage named by a key), `.format_version`,
`.storage_alignment`, `byteorder`, `data/<key>` (each storage's bytes, starting at a
multiple of the storage alignment, 64 bytes, so that `torch.load(mmap=True)` maps them in
place), `version` and `.data/serialization_id`. Where torch is, the records are planned
with torch's own pickler (`runs.file_plans`); this module writes the archive from them and
a buffer holding the storages' bytes: the checkpoint writer process writes from shared
memory without importing torch (a second of CPU and more, on the cores training uses).

Offsets and sizes past 4 GiB are written as zip64 fields (`ZIP64_LIMIT`), as `torch.save`
does for large checkpoints. Only the standard library is imported here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from typing import IO, Any

ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset at or past this is a zip64 field
_MAX16 = 0xFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, before the name
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, before the name
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator
_END = struct.Struct("<IHHHHIIH")  # end of central directory record
_UTF8 = 0x800  # general purpose flag: the names are UTF-8
_VERSION, _VERSION64 = 20, 45  # version needed to extract: plain, zip64

# A record's bytes: the bytes themselves, or (offset, length) in the archive's buffer.
Source = bytes | tuple[int, int]


class Stopped(Exception):
    """The write was asked to stop (`stop` returned true); the file is incomplete."""


class _Entry:
    __slots__ = ("crc", "name", "offset", "size")

    def __init__(self, name: bytes, offset: int, size: int, crc: int) -> None:
        self.name, self.offset, self.size, self.crc = name, offset, size, crc


def write_archive(
    handle: IO[bytes],
    folder: str,
    records: Sequence[tuple[str, Source]],
    buffer: Any,
    *,
    options: dict[str, Any] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> None:
    """Write `records` to `handle` (at its start) as a torch checkpoint archive whose
    records lie under `folder`. `options`: `alignment` (of each record's data, default 64),
    `checksums` (CRC-32 of each record, default true; torch's loader does not read them),
    `zip64_limit` (default `ZIP64_LIMIT`; tests lower it). `stop(nbytes)` is asked before
    each record; when true the write ends with `Stopped`."""
    options = options or {}
    alignment = int(options.get("alignment", 64))
    limit = int(options.get("zip64_limit", ZIP64_LIMIT))
    checksums = bool(options.get("checksums", True))
    view = memoryview(buffer) if buffer is not None else None
    entries: list[_Entry] = []
    position = 0
    for name, source in records:
        data = source if isinstance(source, bytes) else buffer_slice(view, source)
        if stop is not None and stop(len(data)):
            raise Stopped(name)
        entry = _Entry(f"{folder}/{name}".encode(), position, len(data), 0)
        entry.crc = zlib.crc32(data) if checksums else 0
        header = _local_header(entry, alignment, limit)
        handle.write(header)
        handle.write(data)
        position += len(header) + len(data)
        entries.append(entry)
    handle.write(_central_directory(entries, position, limit))


def buffer_slice(view: memoryview | None, source: tuple[int, int]) -> memoryview:
    """The `(offset, length)` bytes of `view`; a range outside it is an error."""
    offset, length = source
    if view is None or offset < 0 or length < 0 or offset + length > view.nbytes:
        raise ValueError(f"a record's bytes ({offset}, {length}) lie outside the buffer")
    return view[offset : offset + length]


def _local_header(entry: _Entry, alignment: int, limit: int) -> bytes:
    """The entry's local header, its extra field padding the data to `alignment`."""
    large = entry.size >= limit
    zip64 = struct.pack("<HHQQ", 1, 16, entry.size, entry.size) if large else b""
    fixed = _LOCAL.size + len(entry.name) + len(zip64) + 4  # 4: the padding field's header
    padding = -(entry.offset + fixed) % alignment
    size = ZIP64_LIMIT if large else entry.size
    header = _LOCAL.pack(
        0x04034B50, _VERSION64 if large else _VERSION, _UTF8, 0, 0, 0, entry.crc, size, size,
        len(entry.name), len(zip64) + 4 + padding,
    )  # fmt: skip
    return header + entry.name + zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding


def _central_directory(entries: list[_Entry], start: int, limit: int) -> bytes:
    """The central directory (from byte `start`) and the end records, zip64 where needed."""
    parts = []
    for entry in entries:
        large_size, large_offset = entry.size >= limit, entry.offset >= limit
        fields = [entry.size, entry.size] if large_size else []
        fields += [entry.offset] if large_offset else []
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = _VERSION64 if fields else _VERSION
        size = ZIP64_LIMIT if large_size else entry.size
        offset = ZIP64_LIMIT if large_offset else entry.offset
        fixed = _CENTRAL.pack(
            0x02014B50, version, version, _UTF8, 0, 0, 0, entry.crc, size, size,
            len(entry.name), len(extra), 0, 0, 0, 0, offset,
        )  # fmt: skip
        parts.append(fixed + entry.name + extra)
    directory = b"".join(parts)
    count, length = len(entries), len(directory)
    end = b""
    if count >= _MAX16 or length >= limit or start >= limit:
        end64 = start + length
        end += _END64.pack(
            0x06064B50, _END64.size - 12, _VERSION64, _VERSION64, 0, 0, count, count, length, start
        )
        end += _LOCATOR.pack(0x07064B50, 0, end64, 1)
        count, length, start = _MAX16, ZIP64_LIMIT, ZIP64_LIMIT
    return directory + end + _END.pack(0x06054B50, 0, 0, count, count, length, start, 0)
