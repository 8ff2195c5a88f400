"""Stop once a metric reaches a value (`stop_when: "val_accuracy >= 0.98"`).

Each condition is checked where its metric is measured: validation metrics (`val_*`) after
each evaluation, `train_loss` at each epoch's end. The first one met asks the loop to stop
at the next step boundary, with the reason (`stop_when: val_accuracy 0.9833 >= 0.98 at
epoch 3, step 120`) as the run's `stop_reason`. A metric the run never measures is an error
at its first evaluation, naming the ones it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config.conditions import Condition, parse_condition
from .base import Callback, Control


class StopWhen(Callback):
    """Stop at the first of `conditions` met (texts such as "val_loss < 0.1")."""

    def __init__(self, conditions: Sequence[str | Condition]) -> None:
        self.conditions = [
            c if isinstance(c, Condition) else parse_condition(c, "stop_when") for c in conditions
        ]

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        self._check(loop, logs, evaluated=True)

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        self._check(loop, logs, evaluated=False)

    def _check(self, loop: Control, logs: dict[str, Any], evaluated: bool) -> None:
        for condition in self.conditions:
            if condition.metric.startswith("val_") != evaluated:
                continue  # each metric where it is measured
            value = logs.get(condition.metric)
            if value is None:
                measured = sorted(k for k in logs if isinstance(logs[k], float))
                raise ValueError(
                    f"stop_when={str(condition)!r}: this run measures no {condition.metric!r} "
                    f"(it has {', '.join(measured)})"
                )
            if condition.met(float(value)):
                state = loop.state
                loop.request_stop(
                    f"stop_when: {condition.metric} {float(value):.6g} {condition.op} "
                    f"{condition.value:g} at epoch {state.epoch}, step {state.global_step}"
                )
                return
