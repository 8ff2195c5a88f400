"""Tensors onto a device (a batch before the step, a checkpoint's tensors after a load), and
which tensors hold inexact values (what NaN checks and averages read)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .containers import sequence_like


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Copy tensors (nested in tuples, lists, dicts) to `device`; async from pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return sequence_like(batch, (move_to_device(value, device) for value in batch))
    return batch


def inexact(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds values that may be NaN or inf and that averaging keeps as they
    are: floating-point or complex (integer buffers are counts, rounded when averaged)."""
    return tensor.is_floating_point() or tensor.is_complex()
