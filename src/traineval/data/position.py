"""Resuming inside an epoch: skip the batches already trained on, by index, without loading them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
        return _skipping(self.inner, self.skip, self.on_skipped)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)  # type: ignore[arg-type]


def skip_batches(
    loader: Iterable[Any], skip: int, on_skipped: Callable[[], None] | None = None
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
        return iter(loader)
    batch_sampler = getattr(loader, "batch_sampler", None)
    map_style = not isinstance(getattr(loader, "dataset", None), IterableDataset)
    if isinstance(loader, DataLoader) and batch_sampler is not None and map_style:
        resumed = DataLoader(
            loader.dataset,
            batch_sampler=_SkipFirst(batch_sampler, skip, on_skipped),
            generator=loader.generator,
            persistent_workers=False,
            **worker_settings(loader),
        )
        return iter(resumed)
    return _skipping(loader, skip, on_skipped)
