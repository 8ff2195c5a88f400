"""Seeding and deterministic mode."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Turn on `torch.use_deterministic_algorithms` for the block, then restore the setting."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def data_generators(loader: Any) -> list[torch.Generator]:
    """The generators a DataLoader draws its shuffle order and worker seeds from (if its own)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    generator = getattr(inner, "generator", None)
    if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
        found.append(generator)
    return found


def capture_rng(generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
    """Every random state a training step can draw from, as tensors and plain values.

    Python's, NumPy's (converted to a tensor so the checkpoint loads with weights_only),
    torch's CPU and CUDA generators, and `generators` (e.g. the data loader's).
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }
    return state


def restore_rng(state: dict[str, Any], generators: Sequence[torch.Generator] | None = ()) -> None:
    """Put back what `capture_rng` took; the generators must be the same ones, in order.

    `generators=None` restores only the global generators (Python, NumPy, torch, CUDA).
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generators is None:
        return
    saved = state["generators"]
    if len(saved) != len(generators):
        raise ValueError(
            f"the checkpoint holds {len(saved)} data-loader generator states but the train "
            f"loader has {len(generators)}; resume with a loader built the same way"
        )
    for generator, generator_state in zip(generators, saved, strict=True):
        generator.set_state(generator_state)
