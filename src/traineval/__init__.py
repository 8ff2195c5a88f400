"""traineval: train and evaluate PyTorch models.

The public API (docs/design.md): `TrainingConfig`, `EvaluationConfig`, `TrainingManager`,
`Evaluator`, `MetricsTracker`, `PerformanceMonitor`, and the enums `TaskType`,
`TrainingMode`, `EvaluationMode`; `load_checkpoint(path, model)` and `load_model(run_dir)`
bring trained weights back, `predict(model, loader)` gives a model's predictions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# isort: split
from .system import requirements  # noqa: F401 - first: refuses a torch too old for safe loading

# isort: split
from .system.moved_modules import install as _install_moved_modules
from .system.version import __version__

_install_moved_modules()

# The public names, imported when first used: `import traineval` (and `traineval --help`)
# does not load torch until a name that needs it is asked for.
_PUBLIC = {
    "Callback": "callbacks",
    "EarlyStopping": "callbacks",
    "EvaluationConfig": "config",
    "EvaluationMode": "config",
    "EvaluationOptions": "evaluation.report",
    "EvaluationReport": "evaluation.report",
    "Evaluator": "assembly.evaluator",
    "LearningRateSearch": "training.lr_finder",
    "MetricsTracker": "runs.tracking",
    "ModelCheckpoint": "callbacks",
    "PerformanceMonitor": "training.monitor",
    "PredictOptions": "evaluation.inference",
    "Predictions": "evaluation.inference",
    "ProgressBar": "callbacks",
    "TaskType": "config",
    "TrainingConfig": "config",
    "TrainingManager": "assembly.manager",
    "TrainingMode": "config",
    "TrainingResult": "assembly.manager",
    "load_checkpoint": "runs.checkpoint",
    "load_model": "commands.load",
    "predict": "evaluation.inference",
}

__all__ = [
    "Callback",
    "EarlyStopping",
    "EvaluationConfig",
    "EvaluationMode",
    "EvaluationOptions",
    "EvaluationReport",
    "Evaluator",
    "LearningRateSearch",
    "MetricsTracker",
    "ModelCheckpoint",
    "PerformanceMonitor",
    "PredictOptions",
    "Predictions",
    "ProgressBar",
    "TaskType",
    "TrainingConfig",
    "TrainingManager",
    "TrainingMode",
    "TrainingResult",
    "__version__",
    "load_checkpoint",
    "load_model",
    "predict",
]

if TYPE_CHECKING:
    from .assembly.evaluator import Evaluator
    from .assembly.manager import TrainingManager, TrainingResult
    from .callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
    from .commands.load import load_model
    from .config import EvaluationConfig, EvaluationMode, TaskType, TrainingConfig, TrainingMode
    from .evaluation.inference import Predictions, PredictOptions, predict
    from .evaluation.report import EvaluationOptions, EvaluationReport
    from .runs.checkpoint import load_checkpoint
    from .runs.tracking import MetricsTracker
    from .training.lr_finder import LearningRateSearch
    from .training.monitor import PerformanceMonitor


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'traineval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
