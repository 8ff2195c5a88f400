"""Evaluation: task detection, streaming metrics, the Evaluator."""

from .evaluator import Evaluator
from .metrics import ConfusionMatrix, ProbabilityStats, RegressionStats, TokenStats
from .model_evaluator import ModelEvaluator

__all__ = [
    "ConfusionMatrix",
    "Evaluator",
    "ModelEvaluator",
    "ProbabilityStats",
    "RegressionStats",
    "TokenStats",
]
