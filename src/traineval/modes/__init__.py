"""Training modes as step functions: `(model, batch) -> StepOutput`; the loop owns the update."""

from __future__ import annotations

from ..config import TrainingMode
from .base import LossFunction, StepFunction, StepOutput, move_to_device, split_batch
from .supervised import SupervisedStep
from .unsupervised import UnsupervisedStep

__all__ = [
    "StepFunction",
    "StepOutput",
    "SupervisedStep",
    "UnsupervisedStep",
    "build_step",
    "move_to_device",
    "split_batch",
]


def build_step(mode: TrainingMode, loss_function: LossFunction) -> StepFunction:
    """The step function of a training mode.

    Raises:
        NotImplementedError: the mode is not supported yet (named in the message).
    """
    if mode is TrainingMode.SUPERVISED:
        return SupervisedStep(loss_function)
    if mode is TrainingMode.UNSUPERVISED:
        return UnsupervisedStep(loss_function)
    raise NotImplementedError(
        f"mode={mode.value!r} is not supported yet; supported modes: 'supervised', 'unsupervised'"
    )
