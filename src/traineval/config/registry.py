"""The names of the training modes: `name -> Mode class`, for config files and `train(mode="...")`.

A leaf module (it imports nothing of traineval), so that the config can check a mode's
settings on construction without the modes above it importing back. The built-in modes
register when `traineval.modes` is imported; the registry imports it by name on its first
lookup (as a plug-in is loaded), so a config checks mode names however little of traineval
was imported before. `traineval.modes.register` adds your own.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

_MODES: dict[str, Any] = {}
BUILT_IN = "traineval.modes"  # the package whose import registers the built-in modes


def _built_in() -> None:
    """Import the built-in modes once (they register themselves); cheap after the first."""
    importlib.import_module(BUILT_IN)


def add(cls: Any, *, replace: bool = False) -> None:
    """Register `cls` under `cls.name`; a taken name needs `replace=True`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"a mode class needs a `name` class attribute that is an identifier, e.g. "
            f"name = 'protonet'; {cls.__name__} has {name!r}"
        )
    if name in _MODES and _MODES[name] is not cls and not replace:
        raise ValueError(
            f"mode name {name!r} is taken by {_MODES[name].__module__}.{_MODES[name].__name__}; "
            "choose another name, or pass replace=True"
        )
    _MODES[name] = cls


def names() -> list[str]:
    """The registered mode names, built-in first."""
    _built_in()
    return list(_MODES)


def lookup(name: Any, *, field: str = "mode") -> Any:
    """The mode class registered as `name`; an unknown name is an error naming the known ones."""
    if isinstance(name, str) and name in _MODES:
        return _MODES[name]
    _built_in()
    if isinstance(name, str) and name in _MODES:
        return _MODES[name]
    hint = difflib.get_close_matches(str(name), list(_MODES), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(
        f"{field}={name!r} is invalid: expected one of {', '.join(map(repr, _MODES))}"
        f"{suggestion}, or a mode registered with traineval.modes.register"
    )


# -- the user's metrics, by name (`traineval.evaluation.register_metric`) ---------------------

_METRICS: dict[str, Any] = {}


def add_metric(name: str, template: Any) -> None:
    """Register a metric under `name`; registering the same object again is not an error."""
    if name in _METRICS and _METRICS[name] is not template:
        raise ValueError(f"a metric named {name!r} is registered already: choose another name")
    _METRICS[name] = template


def metrics() -> dict[str, Any]:
    """The registered metrics by name."""
    return dict(_METRICS)
