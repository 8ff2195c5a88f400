"""traineval: train and evaluate PyTorch models.

The public API (docs/design.md): `TrainingConfig`, `EvaluationConfig`, `TrainingManager`,
`Evaluator`, `MetricsTracker`, `PerformanceMonitor`, and the enums `TaskType`,
`TrainingMode`, `EvaluationMode`.
"""

from . import requirements  # noqa: F401 - first: refuses a torch too old for safe loading
from .callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from .config import EvaluationConfig, EvaluationMode, TaskType, TrainingConfig, TrainingMode
from .evaluation import Evaluator
from .lr_finder import LearningRateSearch
from .manager import TrainingManager, TrainingResult
from .monitor import PerformanceMonitor
from .tracking import MetricsTracker
from .version import __version__

__all__ = [
    "Callback",
    "EarlyStopping",
    "EvaluationConfig",
    "EvaluationMode",
    "Evaluator",
    "LearningRateSearch",
    "MetricsTracker",
    "ModelCheckpoint",
    "PerformanceMonitor",
    "ProgressBar",
    "TaskType",
    "TrainingConfig",
    "TrainingManager",
    "TrainingMode",
    "TrainingResult",
    "__version__",
]
