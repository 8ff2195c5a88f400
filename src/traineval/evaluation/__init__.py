"""Evaluation: task detection, streaming metrics, predictions and plots of a model
(`ModelEvaluator`; `traineval.Evaluator` adds cross-validation over it)."""

from .metrics import ConfusionMatrix, ProbabilityStats, RegressionStats, TokenStats
from .model_evaluator import ModelEvaluator

__all__ = [
    "ConfusionMatrix",
    "ModelEvaluator",
    "ProbabilityStats",
    "RegressionStats",
    "TokenStats",
]
