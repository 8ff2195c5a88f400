"""Reading W&B offline run files (.wandb: a 7-byte header, then LevelDB-log framed protobufs)."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768


def wandb_records(path):
    """Records of a .wandb file (LevelDB log framing after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
