"""Unsupervised mode (autoencoders): the loss compares the model's output with its input."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from ..batches import OutputTransform, prediction_of, reads_prediction
from .base import (
    LossFunction,
    StepOutput,
    batch_size_of,
    compiled_loss,
    count_required_args,
    forward,
    split_batch,
)
from .contract import Context, Mode, ModePlan, register


@register
@dataclasses.dataclass(frozen=True)
class Unsupervised(Mode):
    """Input-only batches (autoencoders): the output is compared with the input (MSE by
    default); validation reports regression metrics of the reconstruction."""

    name: ClassVar[str] = "unsupervised"
    reconstructs: ClassVar[bool] = True

    def plan(self, ctx: Context) -> ModePlan:
        return ModePlan(
            UnsupervisedStep(
                ctx.loss_function, ctx.compile_mode, output_transform=ctx.output_transform
            )
        )


class UnsupervisedStep:
    """Step function for input-only batches; labels in the batch, if any, are ignored.

    A two-argument loss is called as `loss(outputs, inputs)`; a one-argument loss as
    `loss(outputs)` (for models that return what the loss needs, e.g. a VAE's terms). The
    default loss and torch's losses get the model's prediction (the reconstruction: see
    `traineval.batches`), a loss function of your own the output as the model returned it.
    """

    def __init__(
        self,
        loss_function: LossFunction,
        compile_mode: str | None = None,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        self.loss_function = loss_function
        self._loss = compiled_loss(loss_function, compile_mode)
        self.takes_inputs = count_required_args(loss_function) >= 2
        self.output_transform = output_transform
        self._reads_prediction = reads_prediction(loss_function)

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, _ = split_batch(batch)
        outputs = forward(model, inputs)
        if self._reads_prediction:  # the reconstruction; a loss of your own gets the output
            outputs = prediction_of(outputs, self.output_transform)
        loss = self._loss(outputs, inputs) if self.takes_inputs else self._loss(outputs)
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=loss, weight=num_samples, num_samples=num_samples, outputs=outputs, targets=inputs
        )

    def weight(self, batch: Any) -> int:
        """Every sample counts once (a mean over equal-sized samples)."""
        return batch_size_of(split_batch(batch)[0])
