"""Early stopping on the monitored metric, counted in evaluations."""

from __future__ import annotations

from typing import Any

from .base import Callback, Control


class EarlyStopping(Callback):
    """Request a stop after `patience` evaluations in a row without improvement.

    Improvement is judged by the loop's monitor (metric, direction, `min_delta`), the same
    one that picks the best checkpoint.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"early_stopping_patience={patience!r} is invalid: expected >= 1")
        self.patience = patience

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        bad = loop.monitor.num_bad
        if bad >= self.patience:
            loop.request_stop(
                f"early stopping: {loop.monitor.name} did not improve for {bad} evaluations "
                f"(best {loop.monitor.best:.6g} at epoch {loop.state.best_epoch})"
            )
