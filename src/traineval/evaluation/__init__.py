"""Evaluation: task detection, streaming metrics, the Evaluator."""

from .evaluator import Evaluator
from .metrics import ConfusionMatrix, ProbabilityStats, RegressionStats, TokenStats

__all__ = [
    "ConfusionMatrix",
    "Evaluator",
    "ProbabilityStats",
    "RegressionStats",
    "TokenStats",
]
