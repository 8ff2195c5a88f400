"""traineval: train and evaluate PyTorch models.

The public API (docs/design.md): `TrainingConfig`, `EvaluationConfig`, `TrainingManager`,
`Evaluator`, `MetricsTracker`, `PerformanceMonitor`, and the enums `TaskType`,
`TrainingMode`, `EvaluationMode`; `load_checkpoint(path, model)` and `load_model(run_dir)`
bring trained weights back.
"""

# isort: split
from .system import requirements  # noqa: F401 - first: refuses a torch too old for safe loading

# isort: split
from .assembly.evaluator import Evaluator
from .assembly.manager import TrainingManager, TrainingResult
from .callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from .commands.load import load_model
from .config import EvaluationConfig, EvaluationMode, TaskType, TrainingConfig, TrainingMode
from .runs.checkpoint import load_checkpoint
from .runs.tracking import MetricsTracker
from .system.moved_modules import install as _install_moved_modules
from .system.version import __version__
from .training.lr_finder import LearningRateSearch
from .training.monitor import PerformanceMonitor

_install_moved_modules()

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
    "load_checkpoint",
    "load_model",
]
