"""Shared parts of the PPO benchmarks: learning curves (greedy returns at evaluation points,
timed apart) and SB3's PPO optimizer settings as a traineval config."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from traineval import TrainingConfig

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


def sb3_ppo_config(folder: str, seed: int, num_epochs: int, scheduler_type: str) -> TrainingConfig:
    """Stable-Baselines3's PPO optimisation as a traineval config: Adam (eps 1e-5, no weight
    decay) at 1e-3, gradient norm clipped at 0.5, no warmup, quiet."""
    return TrainingConfig(
        num_epochs=num_epochs,
        learning_rate=1e-3,
        optimizer_type="adam",
        adam_epsilon=1e-5,
        weight_decay=0.0,
        scheduler_type=scheduler_type,
        warmup_steps=0,
        max_grad_norm=0.5,
        early_stopping_patience=0,
        seed=seed,
        output_dir=folder,
        tensorboard_logging=False,
        progress_bar=False,
        log_frequency=1000,
    )
