"""Evaluation: task detection, streaming metrics, the Evaluator."""

from .evaluator import Evaluator
from .metrics import ConfusionMatrix, RegressionStats, TokenStats

__all__ = ["ConfusionMatrix", "Evaluator", "RegressionStats", "TokenStats"]
