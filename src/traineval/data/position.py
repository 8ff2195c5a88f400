"""Resuming inside an epoch: skip the batches already trained on, by index, without loading them."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .loaders import worker_settings


def _skipping(
    iterable: Iterable[Any], skip: int, on_skipped: Callable[[], None] | None
) -> Iterator[Any]:
    """Drop the first `skip` items (at the first `next`), call `on_skipped`, yield the rest."""
    iterator = iter(iterable)
    for _ in itertools.islice(iterator, skip):
        pass
    if on_skipped is not None:
        on_skipped()
    yield from iterator


class _SkipFirst:
    """A batch sampler that yields what `inner` yields after its first `skip` index lists."""

    def __init__(
        self, inner: Iterable[list[int]], skip: int, on_skipped: Callable[[], None] | None
    ) -> None:
        self.inner = inner
        self.skip = skip
        self.on_skipped = on_skipped

    def __iter__(self) -> Iterator[list[int]]:
        # `inner`'s own iter now, as the loader calls ours (a sampler that shuffles as its
        # iter is called draws then; a loader with workers calls it twice an epoch)
        return _skipping(iter(self.inner), self.skip, self.on_skipped)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)  # type: ignore[arg-type]


def epoch_batches(loader: Iterable[Any], later_epoch: bool) -> Iterator[Any]:
    """`iter(loader)` for an epoch from its start (`later_epoch`: not the run's first; see
    `seeds_drawn_aside`)."""
    with seeds_drawn_aside(loader, later_epoch):
        return iter(loader)


@contextlib.contextmanager
def seeds_drawn_aside(loader: Any, later_epoch: bool) -> Iterator[None]:
    """A DataLoader with persistent workers draws its workers' base seed from its generator
    (the global one, without) once, as the workers start: in an uninterrupted run at its
    first epoch. Where they start in a later epoch (a resumed run's), the seed is drawn from
    a generator of its own inside the block, so the epoch's shuffle draws what the
    uninterrupted run's did. (What the workers themselves draw, e.g. random augmentations,
    continues from other seeds: persistent workers' own streams are not checkpointed.)"""
    persistent = (
        isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0
    )
    if not (later_epoch and persistent and getattr(loader, "_iterator", None) is None):
        yield
        return
    own = loader.generator
    loader.generator = torch.Generator().manual_seed(WORKER_SEEDS)
    try:
        yield
    finally:
        loader.generator = own


WORKER_SEEDS = 0x5EED  # the seed of the generator a resumed run's persistent workers' seed
# is drawn from


def skip_batches(
    loader: Iterable[Any],
    skip: int,
    on_skipped: Callable[[], None] | None = None,
    later_epoch: bool = False,
) -> Iterator[Any]:
    """Iterate `loader` from batch `skip` on.

    A map-style DataLoader skips by index: its batch sampler draws the same shuffle order
    (from the same generator states) and drops the first `skip` index lists, so the skipped
    samples are never read. Any other iterable is advanced by reading and dropping batches.
    `on_skipped` runs right after the skip, before anything past it is drawn (the loop
    restores the checkpoint's RNG state there: what the sampler draws at the epoch's end,
    e.g. RandomSampler's trailing draw, then happens after it, as in an uninterrupted run).
    """
    if skip == 0:
        if on_skipped is not None:
            on_skipped()
        return epoch_batches(loader, later_epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    map_style = not isinstance(getattr(loader, "dataset", None), IterableDataset)
    if isinstance(loader, DataLoader) and batch_sampler is not None and map_style:
        with seeds_drawn_aside(loader, later_epoch):
            resumed = DataLoader(
                loader.dataset,
                batch_sampler=_SkipFirst(batch_sampler, skip, on_skipped),
                generator=loader.generator,
                persistent_workers=False,
                **worker_settings(loader),
            )
        return iter(resumed)
    return _skipping(loader, skip, on_skipped)
