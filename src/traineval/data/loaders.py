"""Rebuilding a user's DataLoader around another sampler, keeping everything else it set."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader


def worker_settings(loader: DataLoader[Any]) -> dict[str, Any]:
    """How `loader` loads and collates: its workers, collate function and memory pinning.

    What a rebuilt loader must keep; the sampling (sampler, batch size, generator,
    persistent workers) is the caller's to choose.
    """
    return {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "prefetch_factor": loader.prefetch_factor if loader.num_workers > 0 else None,
        "pin_memory_device": loader.pin_memory_device,
    }
