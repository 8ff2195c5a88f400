"""The search space: config fields by dotted name (`training.learning_rate`, `mode.clients`,
`model.options.hidden`), each a list of choices or a range.

```yaml
search:
  learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}   # a training field by its bare name
  batch_size: [16, 32, 64]                                # choices
  model.options.dropout: {low: 0.0, high: 0.5, step: 0.1}
  mode.clients: {low: 2, high: 10}                        # integers: an int range
```

Every range's ends and every choice are checked against the config before a trial starts:
a value the config would refuse is refused here, naming `search.<field>`.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SECTIONS = ("data", "model", "training", "evaluation", "mode")
PLACES = ("training.output_dir", "training.overwrite_output_dir", "evaluation.output_dir")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched field: `choices`, or a range `low`..`high` (`log` scale, `step`)."""

    field: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial: Any) -> Any:
        """The trial's value (Optuna's `suggest_*` under the field's dotted name)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.field, list(self.choices))
        assert self.low is not None
        assert self.high is not None
        if self.integer:
            step = int(self.step or 1)
            return trial.suggest_int(
                self.field, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(
            self.field, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler: choices, or a range with a step (or of ints)."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None
        assert self.high is not None
        if self.integer and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None or self.log:
            raise ValueError(
                f"search.{self.field}: the grid sampler needs a finite list of values: give "
                "choices, or a range with a step (not on a log scale)"
            )
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [self.tidy(self.low + i * self.step) for i in range(count)]

    def tidy(self, value: Any) -> Any:
        """`value` as the user would write it: a value of a stepped float range rounded to
        the digits of its `low` and `step` (Optuna's 0.30000000000000004 is 0.3)."""
        if self.step is None or self.integer or not isinstance(value, float):
            return value
        return round(value, max(_decimals(self.low), _decimals(self.step)))

    def holds(self, value: Any, *, grid: bool = False) -> bool:
        """Whether a trial could get `value` (one of the grid's values when `grid`)."""
        if grid or (self.step is not None and not self.log):
            return value in self.grid()  # a stepped range holds only its steps
        if self.choices is not None:
            return value in self.choices
        assert self.low is not None
        assert self.high is not None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and self.low <= value <= self.high

    def describe(self) -> str:
        """The space in words: `choices [16, 32]`, or `0.0001 to 0.1, log scale`."""
        if self.choices is not None:
            return f"choices {list(self.choices)}"
        scale = ", log scale" if self.log else f", step {self.step}" if self.step else ""
        return f"{self.low} to {self.high}{scale}"

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get (checked against the config)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def parse_space(search: Any, base: Mapping[str, Any]) -> list[Param]:
    """The parameters of the `search` mapping, over the run config `base` (`to_dict()`)."""
    if not isinstance(search, Mapping) or not search:
        raise ValueError(
            f"search={search!r} is invalid: name at least one config field to search, e.g. "
            "search: {learning_rate: {low: 1.0e-4, high: 1.0e-1, log: true}}"
        )
    fields = {str(name): _resolve(str(name), base) for name in search}
    for name, field in fields.items():
        if field in PLACES:
            raise ValueError(
                f"search.{name} is invalid: {field} is not searchable (each trial runs in "
                "its own folder of the study, <output_dir>/trial-NNNN)"
            )
    _refuse_overlaps(fields)
    return [_param(fields[str(name)], spec) for name, spec in search.items()]


def _refuse_overlaps(fields: Mapping[str, str]) -> None:
    """Refuse two names of one field (`learning_rate`, `training.learning_rate`: one range
    was silently ignored) and a field searched with a field inside it (`model.options` and
    `model.options.hidden_sizes`: the trials trained on neither value the table showed)."""
    seen: dict[str, str] = {}
    for name, field in fields.items():
        for other_field, other in seen.items():
            inner, outer = sorted((field, other_field), key=len, reverse=True)
            if field == other_field:
                raise ValueError(
                    f"search.{name} and search.{other} name one field, {field}: search it once"
                )
            if inner.startswith(outer + "."):
                raise ValueError(
                    f"search.{name} and search.{other} overlap: {inner} is inside {outer}; "
                    "search the inner fields one by one"
                )
        seen[field] = name


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with each dotted field set to its value."""
    data = _copy(base)
    for field, value in values.items():
        *parents, leaf = field.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def run_data(
    base: Mapping[str, Any], written: Sequence[str], values: Mapping[str, Any]
) -> dict[str, Any]:
    """A trial's run config with `values` (dotted fields), as a config file would hold it:
    `base` with each value set, its training section only the `written` fields and the
    searched ones, so that a default stays a default (a warmup_steps left at the default
    is shortened quietly there too)."""
    data = apply_values(base, values)
    searched = {field.split(".")[1] for field in values if field.startswith("training.")}
    keep = {*written, *searched}
    data["training"] = {k: v for k, v in data["training"].items() if k in keep}
    return data


def check_values(params: list[Param], base: Mapping[str, Any], build: Callable[..., Any]) -> None:
    """Refuse a range end or a choice that the config (`build(dict)`) would refuse."""
    for param in params:
        for value in param.extremes():
            try:
                build(apply_values(base, {param.field: value}))
            except ValueError as error:
                raise ValueError(
                    f"search.{param.field}: the value {value!r} is refused: {error}"
                ) from None


def _resolve(name: str, base: Mapping[str, Any]) -> str:
    """`name` as a dotted field of the config (a bare name: the section that has it)."""
    if "." not in name:
        owners = [s for s in SECTIONS if isinstance(base.get(s), Mapping) and name in base[s]]
        owners = ["training"] if "training" in owners else owners
        if len(owners) == 1:
            return f"{owners[0]}.{name}"
        if len(owners) > 1:
            raise ValueError(
                f"search.{name} is ambiguous: it is a field of {' and '.join(owners)}; write "
                f"{owners[0]}.{name}"
            )
    section, _, rest = name.partition(".")
    node = base.get(section) if section in SECTIONS else None
    for key in rest.split(".") if rest else []:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, Mapping) and section == "model" and rest.startswith("options."):
            return name  # a model option the factory takes: checked when the model is built
        else:
            node = None
            break
    if node is None or not rest:
        fields = [f"{s}.{k}" for s in SECTIONS if isinstance(base.get(s), Mapping) for k in base[s]]
        hint = difflib.get_close_matches(name, fields, n=1)
        bare = difflib.get_close_matches(name, [f.split(".", 1)[1] for f in fields], n=1)
        suggestion = hint[0] if hint else (bare[0] if bare else None)
        did_you_mean = f" (did you mean {suggestion!r}?)" if suggestion else ""
        raise ValueError(f"search.{name} is invalid: no config field of that name{did_you_mean}")
    return name


def _param(field: str, spec: Any) -> Param:
    allowed = (
        "expected a list of choices, {choices: [...]}, or a range {low: ..., high: ..., "
        "log: true|false, step: ...}"
    )
    if isinstance(spec, (list, tuple)):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"search.{field}={spec!r} is invalid: {allowed}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step"}
    if unknown or ("choices" in spec) == ("low" in spec or "high" in spec):
        raise ValueError(f"search.{field}={dict(spec)!r} is invalid: {allowed}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"search.{field}: choices must be a non-empty list, got {choices!r}")
        if any(isinstance(choice, Mapping) for choice in choices):
            raise ValueError(
                f"search.{field}: a choice is a mapping ({choices!r}); search the fields "
                f"inside it one by one ({field}.<name>: [...])"
            )
        return Param(field, choices=tuple(choices))
    return _range(field, spec)


def _range(field: str, spec: Mapping[str, Any]) -> Param:
    low, high, log, step = (
        spec.get("low"),
        spec.get("high"),
        spec.get("log", False),
        spec.get("step"),
    )
    numbers = [v for v in (low, high, step) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers) or None in (
        low,
        high,
    ):
        raise ValueError(f"search.{field}: a range needs numbers low and high, got {dict(spec)!r}")
    assert low is not None
    assert high is not None
    if not low < high:
        raise ValueError(f"search.{field}: low={low!r} must be below high={high!r}")
    if not isinstance(log, bool):
        raise ValueError(f"search.{field}: log={log!r} must be true or false")
    if log and low <= 0:
        raise ValueError(f"search.{field}: a log-scale range needs low > 0, got {low!r}")
    if step is not None and (step <= 0 or log):
        raise ValueError(f"search.{field}: step={step!r} must be > 0, and not on a log scale")
    return Param(field, low=low, high=high, log=log, step=step)


def _decimals(number: float | None) -> int:
    """How many digits after the point `number` is written with (1e-05: 5)."""
    if number is None:
        return 0
    exponent = decimal.Decimal(repr(float(number))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
