"""The logger protocol, and the fan-out that keeps a failing logger from stopping training."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Logger(Protocol):
    """Where run events go. `metrics` maps names to numbers; other values (`event`, `split`)
    are labels that loggers of numbers skip. `step` counts optimizer updates."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of `metrics` (labels and counters like epoch left out)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and key not in ("epoch", "step")
        and math.isfinite(value)
    }


def check_loggers(loggers: Sequence[Any]) -> None:
    """Refuse, before any work, a logger without a `log(metrics, step)` method (it would
    only be reported as failing at the first record, and the run would go on unlogged);
    `log_config` and `close` are optional."""
    if isinstance(loggers, (str, bytes)) or not isinstance(loggers, Sequence):
        raise TypeError(f"loggers={loggers!r} is invalid: expected a list of loggers")
    for index, target in enumerate(loggers):
        if not callable(getattr(target, "log", None)):
            raise TypeError(
                f"loggers[{index}] ({type(target).__name__}) has no log(metrics, step) "
                "method: a logger needs one (log_config(config) and close() are optional)"
            )


class LoggerHub:
    """Calls every logger; a logger that raises is reported once and never stops training."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)
        self.failures: dict[str, int] = {}
        # records logged in the run (a resumed run's earlier ones included): a checkpoint
        # keeps the count, and a resume cuts metrics.jsonl back to it
        self.records = 0

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.records += 1
        for target in self.loggers:
            self._safely(target, "log", metrics, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for target in self.loggers:
            self._safely(target, "log_config", config)

    def close(self) -> None:
        for target in self.loggers:
            self._safely(target, "close")

    def _safely(self, target: Any, method: str, *args: Any) -> None:
        call = getattr(target, method, None)
        if call is None:  # log_config and close are optional (`check_loggers`)
            return
        try:
            call(*args)
        except Exception as error:  # a logger must never stop training
            name = type(target).__name__
            self.failures[name] = self.failures.get(name, 0) + 1
            if self.failures[name] == 1:
                after = (
                    "its last records may be missing"
                    if method == "close"
                    else "training goes on, further failures of this logger are counted silently"
                )
                logger.warning(
                    "%s.%s failed (%s: %s); %s", name, method, type(error).__name__, error, after
                )
