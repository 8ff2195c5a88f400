"""Supervised mode: `loss_function(model(inputs), targets)`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    LossFunction,
    StepOutput,
    batch_size_of,
    compiled_loss,
    forward,
    loss_weight,
    split_batch,
)


class SupervisedStep:
    """Step function for `(inputs, targets)` batches."""

    def __init__(self, loss_function: LossFunction, compile_mode: str | None = None) -> None:
        self.loss_function = loss_function
        self._loss = compiled_loss(loss_function, compile_mode)

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, targets = split_batch(batch)
        if targets is None:
            raise ValueError(
                "supervised training needs (inputs, targets) batches; this batch has no targets "
                "(use mode=TrainingMode.UNSUPERVISED for input-only data)"
            )
        outputs = forward(model, inputs)
        loss = self._loss(outputs, targets)
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=loss,
            weight=loss_weight(self.loss_function, targets, num_samples),
            num_samples=num_samples,
            outputs=outputs,
            targets=targets,
        )

    def weight(self, batch: Any) -> int | torch.Tensor:
        """The items the loss of `batch` averages over, known before the forward pass (the
        kept, class-weighted targets: a window's micro-batches are weighed by it)."""
        inputs, targets = split_batch(batch)
        return loss_weight(self.loss_function, targets, batch_size_of(inputs), exact=True)
