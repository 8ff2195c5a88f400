"""Settings: `TrainingConfig` and `EvaluationConfig` with a rule beside every field, the rules
themselves, the registry of named parts, and code references by import path."""

from typing import Any

from . import training_config
from .training_config import (
    LEGACY_MODE_KEYS,
    EvaluationConfig,
    EvaluationMode,
    TaskType,
    TrainingConfig,
    TrainingMode,
    apply_overrides,
    load_yaml,
    setting,
)

__all__ = [
    "LEGACY_MODE_KEYS",
    "EvaluationConfig",
    "EvaluationMode",
    "TaskType",
    "TrainingConfig",
    "TrainingMode",
    "apply_overrides",
    "load_yaml",
    "setting",
]


def __getattr__(name: str) -> Any:
    """Every name of `training_config` (earlier versions' `traineval.config` module)."""
    try:
        return getattr(training_config, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
