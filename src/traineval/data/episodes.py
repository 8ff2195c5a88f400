"""Few-shot tasks for meta-learning: N-way K-shot episodes drawn from a labeled dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .splits import dataset_labels

__all__ = ["Episodes"]


Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Episodes(Dataset[Task]):
    """`episodes` tasks, each `ways` classes with `shots` support and `queries` query samples.

    Item `i` is `(support_x, support_y, query_x, query_y)`: `ways * shots` and
    `ways * queries` samples, labels renumbered 0..ways-1 in a random order, so a model can
    only solve a task by adapting to its support set. Item `i` is always the same task (drawn
    from `seed` and `i`), so any loader order, and an exact resume, sees the same tasks.
    A DataLoader with `batch_size=T` stacks T tasks: the batches meta-learning trains on.

    Raises:
        ValueError: fewer than `ways` classes with `shots + queries` samples.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        ways: int,
        shots: int,
        queries: int,
        episodes: int,
        seed: int = 0,
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"episodes={episodes!r} is invalid: expected an integer >= 1")
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.episodes = episodes
        self.seed = seed
        labels = dataset_labels(dataset)
        self.by_class = {
            int(c): np.flatnonzero(labels == c)
            for c in np.unique(labels)
            if (labels == c).sum() >= shots + queries
        }
        if len(self.by_class) < ways:
            most = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
            raise ValueError(
                f"ways={ways} needs {ways} classes of {shots + queries} samples each "
                f"(shots={shots} + queries={queries}); only {len(self.by_class)} of its classes "
                f"have that many (its largest has {most})"
            )
        self.classes = np.array(sorted(self.by_class))

    def __len__(self) -> int:
        return self.episodes

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.episodes:
            raise IndexError(f"episode {index} of {self.episodes}")
        rng = np.random.default_rng((self.seed, index))
        support: list[Any] = []
        query: list[Any] = []
        for new_label, c in enumerate(rng.choice(self.classes, self.ways, replace=False)):
            chosen = rng.choice(self.by_class[int(c)], self.shots + self.queries, replace=False)
            rows = [self.dataset[int(j)][0] for j in chosen]
            support += [(x, new_label) for x in rows[: self.shots]]
            query += [(x, new_label) for x in rows[self.shots :]]

        def stack(pairs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            return x, torch.tensor([p[1] for p in pairs])

        return (*stack(support), *stack(query))
