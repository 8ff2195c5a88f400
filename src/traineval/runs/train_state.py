"""What the loop counts (`TrainState`): plain values only, so it goes into a checkpoint as is."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["HistoryJson", "TrainState", "empty_history"]


RANK_SUMS = ("epoch_loss_sum", "epoch_loss_weight", "interval_loss_sum", "interval_loss_weight")


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
    timed_out: bool = False  # max_time was up (resumable: `last` holds the run as it stood)
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
        """The counters, with copies of the lists that grow (a few microseconds whatever
        the history's length: `dataclasses.asdict` deep-copied every entry on every save)."""
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        state["history"] = {key: list(values) for key, values in self.history.items()}
        state["interval_norms"] = list(self.interval_norms)
        state["interval_metrics"] = {k: list(v) for k, v in self.interval_metrics.items()}
        return state

    def rank_sums(self) -> dict[str, Any]:
        """This rank's running sums (its micro-batches' losses and step metrics, summed over
        the ranks only when logged): a checkpoint keeps each rank's."""
        return {
            **{name: getattr(self, name) for name in RANK_SUMS},
            "interval_metrics": {k: list(v) for k, v in self.interval_metrics.items()},
        }

    def load_rank_sums(self, sums: dict[str, Any]) -> None:
        for name in (*RANK_SUMS, "interval_metrics"):
            if name in sums:
                setattr(self, name, sums[name])

    def record_epoch(self, train_loss: float, val_loss: float | None, lr: float) -> None:
        """The epoch's entries of the history."""
        for key, value in zip(
            ("epoch", "train_loss", "val_loss", "learning_rate"),
            (self.epoch, train_loss, val_loss, lr),
            strict=True,
        ):
            self.history[key].append(value)

    def record_evaluation(self, metrics: dict[str, float]) -> None:
        """An evaluation's metrics (unprefixed), at this step."""
        self.last_eval_step = self.global_step
        self.history["val_metrics"].append(dict(metrics))
        self.history["val_steps"].append(self.global_step)

    def record_best(self, value: float) -> None:
        """The monitored metric improved to `value` here."""
        self.best_metric, self.best_epoch, self.best_step = value, self.epoch, self.global_step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            if field.name in state:
                setattr(self, field.name, state[field.name])
        if isinstance(self.history, str):  # a checkpoint keeps it as one JSON string
            self.history = json.loads(self.history)


def empty_history() -> dict[str, list[Any]]:
    """The training history's shape: per-epoch lists, and one entry per evaluation."""
    keys = ("epoch", "train_loss", "val_loss", "learning_rate", "val_metrics", "val_steps")
    return {key: [] for key in keys}


class HistoryJson:
    """A history (lists that only grow) as one JSON string, each entry encoded once: saves
    of a long run of tiny epochs cost the same at its end as at its start. Pickled entry by
    entry, the history made each save cost time in proportion to the run's length; JSON is
    exact for floats, NaN included (`load_state_dict` reads both forms)."""

    def __init__(self) -> None:
        self.encoded: dict[str, tuple[int, str]] = {}  # key -> entries encoded, their JSON

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` with its "history" as one JSON string."""
        fields = []
        for key, values in state["history"].items():
            count, text = self.encoded.get(key, (0, ""))
            if count > len(values):  # not the same history any more: start again
                count, text = 0, ""
            if count < len(values):
                new = ",".join(json.dumps(value, default=float) for value in values[count:])
                count, text = len(values), f"{text},{new}" if text else new
                self.encoded[key] = (count, text)
            fields.append(f"{json.dumps(key)}:[{text}]")
        return {**state, "history": "{" + ",".join(fields) + "}"}
