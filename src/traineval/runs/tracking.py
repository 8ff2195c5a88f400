"""Metric history (`MetricsTracker`) and the plateau logic behind early stopping and LR decay."""

from __future__ import annotations

import json
import math
from typing import Any


class MetricsTracker:
    """Track and manage training metrics (the specification's `MetricsTracker`).

    Example:
        >>> tracker = MetricsTracker()
        >>> tracker.update({"val_loss": 0.5}, step=10)
        >>> tracker.update({"val_loss": 0.3}, step=20)
        >>> tracker.get_best_metric("val_loss", minimize=True)
        (0.3, 20)
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}

    def update(self, metrics: dict[str, float], step: int) -> None:
        """Record each metric's value at `step`; the latest value is kept in `metrics`."""
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, value))
            self.metrics[key] = value

    def get_best_metric(self, metric_name: str, minimize: bool = True) -> tuple[float, int]:
        """Return `(best value, step)` of a metric; the first occurrence wins ties.

        Raises:
            KeyError: `metric_name` was never recorded (the message lists the known names).
        """
        if metric_name not in self.history:
            known = ", ".join(sorted(self.history)) or "none recorded yet"
            raise KeyError(f"no metric named {metric_name!r}; known metrics: {known}")
        entries = [(step, value) for step, value in self.history[metric_name] if _finite(value)]
        if not entries:
            raise ValueError(f"metric {metric_name!r} has no finite value to rank")
        pick = min if minimize else max
        step, value = pick(entries, key=lambda entry: entry[1])
        return value, step

    def state_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metrics = dict(state["metrics"])
        history = state["history"]
        if isinstance(history, str):  # a checkpoint keeps it as one JSON string
            history = json.loads(history)
        self.history = {k: [(e[0], e[1]) for e in v] for k, v in history.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class Plateau:
    """Decide whether a stream of metric values still improves.

    A value improves on the best seen so far when it is better by more than `min_delta`;
    `num_bad` counts the values since the last improvement. NaN never improves.

    Example:
        >>> p = Plateau(minimize=True, min_delta=0.0)
        >>> [p.update(v) for v in [1.0, 0.9, 0.95, 0.9, 0.8]]
        [True, True, False, False, True]
        >>> p.best, p.num_bad
        (0.8, 0)
    """

    def __init__(self, minimize: bool = True, min_delta: float = 0.0) -> None:
        self.minimize = minimize
        self.min_delta = min_delta
        self.best: float | None = None
        self.num_bad = 0

    def update(self, value: float) -> bool:
        """Take the next value; return whether it is an improvement."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.minimize:
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.num_bad = state["num_bad"]
