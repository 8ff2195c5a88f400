"""Settings: `TrainingConfig` and `EvaluationConfig` with a rule beside every field, the rules
themselves, the registry of named parts, and code references by import path."""

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
