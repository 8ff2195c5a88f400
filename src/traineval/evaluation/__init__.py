"""Evaluation: task detection, streaming metrics, predictions and plots of a model
(`ModelEvaluator`; `traineval.Evaluator` adds cross-validation over it), and your own
metrics beside the built-in ones (`metric`, `register_metric`, `StreamingMetric`)."""

from typing import Any

from .metrics import ConfusionMatrix, ProbabilityStats, RegressionStats, TokenStats
from .model_evaluator import ModelEvaluator
from .report import EvaluationOptions, EvaluationReport
from .user_metrics import StreamingMetric, metric, register_metric


def __getattr__(name: str) -> Any:  # Evaluator (it trains folds): traineval.Evaluator
    from ..system.moved_modules import moved_name

    return moved_name(__name__, name)


__all__ = [
    "ConfusionMatrix",
    "EvaluationOptions",
    "EvaluationReport",
    "ModelEvaluator",
    "ProbabilityStats",
    "RegressionStats",
    "StreamingMetric",
    "TokenStats",
    "metric",
    "register_metric",
]
