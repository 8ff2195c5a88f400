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


def build_step(
    mode: TrainingMode, loss_function: LossFunction, compile_mode: str | None = None
) -> StepFunction:
    """The step function of a training mode; `compile_mode` compiles its loss function.

    Raises:
        NotImplementedError: the mode is not supported yet (named in the message).
    """
    if mode is TrainingMode.SUPERVISED:
        return SupervisedStep(loss_function, compile_mode)
    if mode is TrainingMode.UNSUPERVISED:
        return UnsupervisedStep(loss_function, compile_mode)
    raise NotImplementedError(
        f"mode={mode.value!r} is not supported yet; supported modes: 'supervised', 'unsupervised'"
    )
