"""Which mode a run trains: `resolve_mode` turns a name, a `TrainingMode` or an instance into
the Mode instance, with the config's `mode_settings` for it."""

from __future__ import annotations

from typing import Any

from ..config.training_config import TrainingConfig, TrainingMode
from .contract import Mode, mode_class


def resolve_mode(mode: Any, config: TrainingConfig | None = None) -> Mode:
    """The Mode instance `mode` names: an instance as it is, a `TrainingMode` or a registered
    name with the config's `mode_settings` for it.

    Raises:
        ValueError: an unknown name, or settings given both by the instance and the config.
        TypeError: anything else.
    """
    settings = config.mode_settings if config is not None else {}
    if isinstance(mode, Mode):
        given = _given(settings, type(mode))
        if given and any(mode.settings().get(k) != v for k, v in given.items()):
            raise ValueError(
                f"mode={mode!r} and the config's mode_settings[{mode.name!r}]={given!r} "
                "disagree: give the mode's settings in one place"
            )
        return mode
    if isinstance(mode, TrainingMode):
        mode = mode.value
    if isinstance(mode, type) and issubclass(mode, Mode):
        mode = mode.name
    if not isinstance(mode, str):
        raise TypeError(
            "mode must be a TrainingMode, a registered mode name or a Mode instance, got "
            f"{type(mode).__name__}"
        )
    cls = mode_class(mode)
    if cls.name in cls.aliases:  # "reinforcement" itself: its settings choose the algorithm
        return cls.from_settings(settings.get(cls.name, {}))
    return cls.from_settings(_given(settings, cls))


def _given(settings: dict[str, dict[str, Any]], cls: type[Mode]) -> dict[str, Any]:
    """The config's settings for `cls`, under its name or the names it also goes by
    (`Mode.aliases`: PPO's and policy gradient's under "reinforcement")."""
    given: dict[str, Any] = {}
    for name in cls.aliases:  # (the alias's choice of algorithm is made: not a setting)
        given.update({k: v for k, v in settings.get(name, {}).items() if k != "algorithm"})
    given.update(settings.get(cls.name, {}))
    return given
