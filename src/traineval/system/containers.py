"""Containers rebuilt around new items: what every walk over a tree of tensors (a batch
moved to a device, a checkpoint copied for a background write) shares."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def sequence_like(value: list[Any] | tuple[Any, ...], items: Iterable[Any]) -> Any:
    """`items` in a container of `value`'s kind: a list, a named tuple of the same type (its
    fields by position), a plain tuple for a tuple or any other tuple subclass (torch.Size
    holds no tensors to replace)."""
    if isinstance(value, list):
        return list(items)
    if hasattr(value, "_fields"):
        return type(value)(*items)
    return tuple(items)
