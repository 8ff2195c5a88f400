"""Sharding loaders across the ranks of a data-parallel job: each rank's share of the
training batches (a `DistributedSampler`, padded as it pads) and a disjoint, unpadded share
of the evaluation samples (merged exactly afterwards)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from ..system.distributed import Distributed
from .loaders import worker_settings

logger = logging.getLogger(__name__)


def shard_train_loader(loader: Any, job: Distributed, seed: int) -> Any:
    """Give each rank its share of a DataLoader's batches (a `DistributedSampler`).

    A loader that already has a DistributedSampler is kept; a shuffling (RandomSampler) or
    sequential one is rebuilt around a DistributedSampler with the same shuffling, seeded
    with `seed` (reshuffled per epoch by the loop's `set_epoch`). As with
    DistributedSampler, a dataset that does not divide by the world size is padded with
    repeated samples, so every rank makes the same number of steps.
    """
    if not job.enabled:
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        logger.warning(
            "the train loader is not a map-style DataLoader: each rank trains on what it "
            "yields, so it must yield this rank's share itself (rank %d of %d)",
            job.rank,
            job.world_size,
        )
        return loader
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    if type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(
            f"the train loader has a custom batch_sampler ({type(loader.batch_sampler).__name__})"
            "; under distributed training give it a DistributedSampler yourself, or use "
            "sampler/shuffle with batch_size so traineval can insert one"
        )
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise ValueError(
                "the train loader's RandomSampler draws with replacement or a fixed "
                "num_samples; under distributed training give it a DistributedSampler yourself"
            )
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(
            f"the train loader has a custom sampler ({type(sampler).__name__}); under "
            "distributed training wrap or replace it with a DistributedSampler yourself"
        )
    distributed: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=job.world_size,
        rank=job.rank,
        shuffle=shuffle,
        seed=seed,
    )
    generator = loader.generator
    if generator is not None:
        # The loader's generator seeds its workers: a copy per rank would give every rank
        # the same augmentation randomness. Offset it by the rank instead.
        generator = torch.Generator().manual_seed(generator.initial_seed() + job.rank)
    return _rebuild(loader, distributed, generator)


class ShardSampler(Sampler[int]):
    """Rank r of n takes indices r, r+n, r+2n, ...: every sample once, none repeated."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length = length
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def shard_eval_loader(loader: Any, job: Distributed) -> Any:
    """Each rank evaluates a disjoint share; together every sample exactly once.

    Unlike training, nothing is padded: metrics are merged across ranks afterwards, so
    uneven shares are exact. A loader with its own DistributedSampler (which pads) or one
    that is not a map-style DataLoader is kept, with a warning.
    """
    if not job.enabled:
        return loader
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader.dataset, IterableDataset)
        or type(loader.batch_sampler) is not BatchSampler
        or not isinstance(loader.sampler, (SequentialSampler, RandomSampler))
    ):
        logger.warning(
            "the validation loader cannot be sharded by traineval (not a plain map-style "
            "DataLoader): each rank evaluates what it yields, and the metrics merge that"
        )
        return loader
    length = len(loader.dataset)  # type: ignore[arg-type]
    return _rebuild(loader, ShardSampler(length, job.rank, job.world_size), loader.generator)


def _rebuild(
    loader: DataLoader[Any], sampler: Sampler[int], generator: torch.Generator | None
) -> DataLoader[Any]:
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        generator=generator,
        persistent_workers=loader.persistent_workers,
        **worker_settings(loader),
    )
