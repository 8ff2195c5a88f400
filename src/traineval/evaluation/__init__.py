"""Evaluation: task detection, streaming metrics, predictions and plots of a model
(`ModelEvaluator`; `traineval.Evaluator` adds cross-validation over it)."""

from typing import Any

from .metrics import ConfusionMatrix, ProbabilityStats, RegressionStats, TokenStats
from .model_evaluator import ModelEvaluator


def __getattr__(name: str) -> Any:  # Evaluator (it trains folds): traineval.Evaluator
    from ..system.moved_modules import moved_name

    return moved_name(__name__, name)


__all__ = [
    "ConfusionMatrix",
    "ModelEvaluator",
    "ProbabilityStats",
    "RegressionStats",
    "TokenStats",
]
