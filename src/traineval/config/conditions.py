"""Stop conditions as a config file writes them: `stop_when: "val_accuracy >= 0.98"` (a
metric, a comparison, a number) and `max_time: "2h"` (a duration).

Example:
    >>> parse_condition("val_accuracy >= 0.98")
    Condition(metric='val_accuracy', op='>=', value=0.98)
    >>> parse_condition("val_loss<0.1").met(0.05)
    True
    >>> [parse_duration(t) for t in (90, "90s", "1.5m", "2h", "1d", "01:30:00", "1:00:00:00")]
    [90.0, 90.0, 90.0, 7200.0, 86400.0, 5400.0, 86400.0]
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from .checks import fail

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")

CONDITION_TEXT = "a metric, a comparison and a number, e.g. 'val_accuracy >= 0.98'"
DURATION_TEXT = "seconds (a number), '45m', '2h', '1.5d', or 'HH:MM:SS' / 'DD:HH:MM:SS'"


@dataclasses.dataclass(frozen=True)
class Condition:
    """`metric op value`: met by a metric's value when the comparison holds."""

    metric: str
    op: str
    value: float

    def met(self, observed: float) -> bool:
        return _COMPARISONS[self.op](observed, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def parse_condition(text: Any, field: str = "stop_when") -> Condition:
    """A `Condition` from `"<metric> <op> <number>"`; anything else is an error naming
    `field`, the value and the shape allowed."""
    found = _CONDITION.match(text) if isinstance(text, str) else None
    if found is None:
        fail(field, text, f"expected {CONDITION_TEXT} (comparisons: >=, >, <=, <)")
    metric, op, number = found.groups()
    try:
        value = float(number)
    except ValueError:
        fail(field, text, f"expected a number after {op!r}, got {number!r}")
    if not math.isfinite(value):
        fail(field, text, f"expected a finite number after {op!r}")
    return Condition(metric, op, value)


def parse_duration(value: Any, field: str = "max_time") -> float:
    """Seconds from a number of seconds, `"<n>s|m|h|d"`, or `"[DD:]HH:MM:SS"`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (unit := _DURATION.match(value)):
        seconds = float(unit.group(1)) * _UNITS[unit.group(2)]
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(:\d{1,2}){2,3}\s*", value):
        parts = [int(p) for p in value.strip().split(":")]
        scales = (1, 60, 3600, 86400)[: len(parts)]
        seconds = float(sum(p * s for p, s in zip(reversed(parts), scales, strict=True)))
    else:
        fail(field, value, f"expected {DURATION_TEXT}")
    if not (math.isfinite(seconds) and seconds > 0):
        fail(field, value, f"expected a duration > 0: {DURATION_TEXT}")
    return seconds
