"""What the loop counts (`TrainState`): plain values only, so it goes into a checkpoint as is."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["TrainState", "empty_history"]


@dataclasses.dataclass
class TrainState:
    """Everything the loop counts; plain values only, so it goes into a checkpoint as is.

    Epochs are numbered from 1; `global_step` counts optimizer updates; `batch_in_epoch`
    counts the micro-batches of the current epoch already trained on.
    """

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    stop_reason: str | None = None
    stopped_early: bool = False
    finished: bool = False
    last_eval_step: int | None = None
    skipped_steps: int = 0
    consecutive_non_finite: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_weight: float = 0.0
    interval_loss_sum: float = 0.0
    interval_loss_weight: float = 0.0
    interval_norms: list[float] = dataclasses.field(default_factory=list)
    # a step function's own metrics since the last log: name -> [sum, count]
    interval_metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epoch_rng: dict[str, Any] | None = None
    history: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: empty_history())

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            if field.name in state:
                setattr(self, field.name, state[field.name])


def empty_history() -> dict[str, list[Any]]:
    """The training history's shape: per-epoch lists, and one entry per evaluation."""
    keys = ("epoch", "train_loss", "val_loss", "learning_rate", "val_metrics", "val_steps")
    return {key: [] for key in keys}
