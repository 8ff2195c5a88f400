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

    Python's and NumPy's (their words as tensors: the checkpoint loads with weights_only,
    and each state is one object to write, not hundreds),
    torch's CPU and CUDA generators, and `generators` (e.g. the data loader's).
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        # Python's 625 words as one tensor: one object for the pickler, not 625
        "python": (version, torch.tensor(internal, dtype=torch.int64), python_gauss),
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
    if isinstance(internal, torch.Tensor):
        internal = internal.tolist()  # written as a tensor; older checkpoints: a tuple
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


def _held_generators(dataset: Any) -> list[str]:
    """Attributes of `dataset` (or of the datasets it wraps) that hold a NumPy generator."""
    found: list[str] = []
    seen: set[int] = set()
    path = "dataset"
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        for name, value in vars(dataset).items() if hasattr(dataset, "__dict__") else ():
            if isinstance(value, (np.random.Generator, np.random.RandomState)):
                found.append(f"{path}.{name}")
        dataset, path = getattr(dataset, "dataset", None), f"{path}.dataset"
    return found


class ReseedHeldGenerators:
    """A DataLoader `worker_init_fn` that gives each worker's copy of the dataset's NumPy
    generators a seed of its own (the worker's torch seed, as torch does for NumPy's global
    state), then calls the loader's own `worker_init_fn`."""

    def __init__(self, attributes: list[str], then: Any = None) -> None:
        self.attributes, self.then = attributes, then

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        assert info is not None, "a worker_init_fn runs in a DataLoader worker"
        for attribute in self.attributes:
            owner: Any = info.dataset
            *inner, name = attribute.split(".")[1:]
            for step in inner:
                owner = getattr(owner, step)
            seed = np.random.SeedSequence([info.seed % 2**32, worker_id])
            value = getattr(owner, name)
            if isinstance(value, np.random.RandomState):
                value.seed(seed.generate_state(1)[0])
            else:
                setattr(owner, name, np.random.Generator(type(value.bit_generator)(seed)))
        if self.then is not None:
            self.then(worker_id)


def reseed_held_generators(loader: Any) -> list[str]:
    """When `loader` runs workers over a dataset that holds NumPy generators (every worker
    would get a copy and draw the same numbers), make each worker reseed its copy; returns
    the attributes found (none: the loader is left as it is)."""
    if not isinstance(loader, torch.utils.data.DataLoader) or loader.num_workers == 0:
        return []
    if isinstance(loader.worker_init_fn, ReseedHeldGenerators):
        return loader.worker_init_fn.attributes
    found = _held_generators(loader.dataset)
    if found:
        loader.worker_init_fn = ReseedHeldGenerators(found, loader.worker_init_fn)
    return found
