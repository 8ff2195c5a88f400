"""Value checks shared by the configs and the modes' settings.

Each raises `SettingError` (a `ValueError`) naming the field, the value and what is allowed,
so a bad setting is refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


class SettingError(ValueError):
    """A setting's value is not allowed: `field`, `value` and `allowed` say which and why."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        super().__init__(f"{field}={_shown(value)} is invalid: {allowed}")
        self.field = field
        self.value = value
        self.allowed = allowed


def _shown(value: Any) -> str:
    """`value` as an error shows it: its repr, cut in the middle past 200 characters (a
    hostile value of megabytes is one line still)."""
    shown = repr(value)
    if len(shown) <= 200:
        return shown
    return f"{shown[:120]}...{shown[-40:]} ({len(shown)} characters)"


def fail(field: str, value: Any, allowed: str) -> NoReturn:
    raise SettingError(field, value, allowed)


# No count in a training setting comes near 2**31 (sizes, steps, epochs, frequencies); a
# larger one is a typo or a hostile value, refused before it reaches an allocation or islice.
INT_LIMIT = 2**31 - 1


def integer(field: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    """An integer (not a bool) >= `minimum`, at most `maximum` (default `INT_LIMIT`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, value, f"expected an integer >= {minimum}{_text_note(value)}")
    if maximum is not None and value > maximum:
        fail(field, value, f"expected an integer in [{minimum}, {maximum}]")
    if value > INT_LIMIT:
        fail(
            field, value, f"expected an integer >= {minimum} and at most {INT_LIMIT:,} (2**31 - 1)"
        )


def number(
    field: str, value: Any, *, minimum: float, strict: bool = False, below: float | None = None
) -> None:
    """A finite number >= `minimum` (> with `strict`), and < `below` when given."""
    relation = ">" if strict else ">="
    allowed = f"expected a finite number {relation} {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(field, value, allowed + _text_note(value))
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        fail(field, value, allowed)
    if below is not None and value >= below:
        opening = "(" if strict else "["
        fail(field, value, f"expected a number in {opening}{minimum:g}, {below:g})")


def _text_note(value: Any) -> str:
    """For a number given as text (`batch_size: "32"`): say so, and how to write it."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return "; got text"
    return f"; got the text {value!r}: write {value.strip()} without quotes"


def boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(field, value, "expected true or false")


def choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        fail(field, value, f"expected one of {', '.join(map(repr, choices))}{suggestion}")


def subset(field: str, values: Any, choices: Sequence[str]) -> None:
    if isinstance(values, str) or not isinstance(values, Iterable):
        fail(field, values, f"expected a list drawn from {', '.join(map(repr, choices))}")
    for value in values:
        choice(f"{field}[]", value, choices)


# -- rules that stand beside a config field (`dataclasses.field(metadata={"rule": ...})`) -----


class Rule:
    """What a field allows: `rule(field, value)` raises `SettingError` or returns the value
    (normalised: lists to tuples, ints to floats); `str(rule)` says it for the reference."""

    def __call__(self, field: str, value: Any) -> Any:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


class Int(Rule):
    def __init__(self, minimum: int, *, maximum: int | None = None, optional: bool = False) -> None:
        self.minimum, self.maximum, self.optional = minimum, maximum, optional

    def __call__(self, field: str, value: Any) -> Any:
        if not (self.optional and value is None):
            integer(field, value, minimum=self.minimum, maximum=self.maximum)
        return value

    def __str__(self) -> str:
        allowed = f"integer >= {self.minimum}"
        if self.maximum is not None:
            allowed = f"integer in [{self.minimum}, {self.maximum}]"
        return allowed + (", or null" if self.optional else "")


class Number(Rule):
    def __init__(
        self,
        minimum: float,
        *,
        strict: bool = False,
        below: float | None = None,
        at_most: float | None = None,
        optional: bool = False,
    ) -> None:
        self.minimum, self.strict, self.below, self.at_most = minimum, strict, below, at_most
        self.optional = optional

    def __call__(self, field: str, value: Any) -> Any:
        if self.optional and value is None:
            return value
        number(field, value, minimum=self.minimum, strict=self.strict, below=self.below)
        if self.at_most is not None and value > self.at_most:
            fail(field, value, f"expected a {self._range()}")
        return value

    def _range(self) -> str:
        if self.at_most is not None:
            return f"number in {'(' if self.strict else '['}{self.minimum:g}, {self.at_most:g}]"
        if self.below is not None:
            return f"number in {'(' if self.strict else '['}{self.minimum:g}, {self.below:g})"
        return f"number {'>' if self.strict else '>='} {self.minimum:g}"

    def __str__(self) -> str:
        return self._range() + (", or null" if self.optional else "")


class Flag(Rule):
    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional

    def __call__(self, field: str, value: Any) -> Any:
        if not (self.optional and value is None):
            boolean(field, value)
        return value

    def __str__(self) -> str:
        return "true or false" + (", or null (auto)" if self.optional else "")


class OneOf(Rule):
    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def __call__(self, field: str, value: Any) -> Any:
        choice(field, value, self.choices)
        return value

    def __str__(self) -> str:
        return "one of " + ", ".join(self.choices)


class Custom(Rule):
    """A rule written as a function `(field, value) -> value`, described by `text`."""

    def __init__(self, function: Any, text: str) -> None:
        self.function, self.text = function, text

    def __call__(self, field: str, value: Any) -> Any:
        return self.function(field, value)

    def __str__(self) -> str:
        return self.text


def field_default(field: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default (its factory's value), or `dataclasses.MISSING`."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING
