"""Learning curves of RL benchmarks: greedy returns at evaluation points, timed apart."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

Act = Callable[[np.ndarray], np.ndarray]
Returns = Callable[[Act, int, int], list[float]]  # (act, episodes, first seed) -> returns


class Curve:
    """Evaluation points of one run: (environment steps, mean greedy return over 20 fresh
    episodes, the same seeds for every library), and the seconds they took."""

    def __init__(self, seed: int, returns: Returns) -> None:
        self.seed, self.returns = seed, returns
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0

    def add(self, steps: int, act: Act) -> None:
        started = time.perf_counter()
        values = self.returns(act, 20, 10_000 * (self.seed + 1) + len(self.points) * 100)
        self.points.append((steps, float(np.mean(values))))
        self.seconds += time.perf_counter() - started

    def first_at(self, threshold: float) -> int | None:
        return next((steps for steps, value in self.points if value >= threshold), None)
