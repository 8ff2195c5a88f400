"""Callbacks: observe the loop and request stops and saves; the loop acts on requests."""

from .base import Callback
from .checkpointing import BestWeights, ModelCheckpoint
from .early_stopping import EarlyStopping
from .progress import EpochSummary, ProgressBar
from .stop_when import StopWhen

__all__ = [
    "BestWeights",
    "Callback",
    "EarlyStopping",
    "EpochSummary",
    "ModelCheckpoint",
    "ProgressBar",
    "StopWhen",
]
