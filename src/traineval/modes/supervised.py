"""Supervised mode: `loss_function(prediction, targets)`, or the model's own loss."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..tasks import scores_next_token
from ..training.batches import (
    ModelLoss,
    OutputTransform,
    prediction_of,
    reads_prediction,
    shifted,
    unsqueezed,
)
from .base import (
    LossFunction,
    StepOutput,
    batch_size_of,
    checked_loss,
    compiled_loss,
    forward,
    loss_weight,
    split_batch,
)
from .contract import Context, Mode, ModePlan, register


@register
@dataclasses.dataclass(frozen=True)
class Supervised(Mode):
    """`(inputs, targets)` batches: the loss of the prediction against the targets (or the
    model's own loss, for Hugging Face models given `labels`)."""

    name: ClassVar[str] = "supervised"
    supervised_loss: ClassVar[bool] = True

    def plan(self, ctx: Context) -> ModePlan:
        return ModePlan(
            SupervisedStep(
                ctx.loss_function,
                ctx.compile_mode,
                output_transform=ctx.output_transform,
                model_loss=ctx.model_loss,
                label_shift=ctx.label_shift,
            )
        )


class SupervisedStep:
    """Step function for `(inputs, targets)` batches (or mappings with a label key).

    With `model_loss` (a model that computes its own loss, see `traineval.training.batches`), a
    mapping batch that carries `labels` trains on the model's loss, weighed by the label
    positions it
    keeps. Otherwise the loss compares the model's prediction (read by `output_transform`, or
    the default rule) with the targets; a loss function of your own that is not one of
    torch's receives the model's output as returned.
    """

    def __init__(
        self,
        loss_function: LossFunction,
        compile_mode: str | None = None,
        *,
        output_transform: OutputTransform | None = None,
        model_loss: ModelLoss | None = None,
        label_shift: int = 0,
    ) -> None:
        self.loss_function = loss_function
        self._loss = compiled_loss(loss_function, compile_mode)
        self.output_transform = output_transform
        self.model_loss = model_loss
        self._reads_prediction = reads_prediction(loss_function)
        # a causal LM under traineval's token loss: logits at t against the label at t + 1
        self.label_shift = label_shift if scores_next_token(loss_function) else 0

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        if self.model_loss is not None and self.model_loss.applies(batch):
            return self._own_loss(model, batch)
        inputs, targets = split_batch(batch)
        if targets is None:
            raise ValueError(
                "supervised training needs (inputs, targets) batches; this batch has no targets "
                "(use mode=TrainingMode.UNSUPERVISED for input-only data)"
            )
        outputs = forward(model, inputs)
        if self._reads_prediction:
            if self.output_transform is not None or type(outputs) is not torch.Tensor:
                outputs = prediction_of(outputs, self.output_transform)  # a tensor: as is
            if outputs.ndim < 2:  # a squeezed batch of one: its batch dimension back
                outputs = unsqueezed(outputs, inputs)
            if self.label_shift:
                outputs, targets = shifted(outputs, targets, self.label_shift)
        loss = checked_loss(self.loss_function, outputs, targets, compute=self._loss)
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=loss,
            weight=loss_weight(self.loss_function, targets, num_samples),
            num_samples=num_samples,
            outputs=outputs,
            targets=targets,
        )

    def _own_loss(self, model: nn.Module, batch: Any) -> StepOutput:
        assert self.model_loss is not None
        outputs, loss = self.model_loss(model, batch)
        labels = batch["labels"]
        return StepOutput(
            loss=loss,
            weight=self.model_loss.items(labels, exact=False),
            num_samples=batch_size_of(labels),
            outputs=outputs,
            targets=labels,
        )

    def weight(self, batch: Any) -> int | torch.Tensor:
        """The items the loss of `batch` averages over, known before the forward pass (the
        kept, class-weighted targets: a window's micro-batches are weighed by it)."""
        if self.model_loss is not None and self.model_loss.applies(batch):
            return self.model_loss.items(batch["labels"])
        inputs, targets = split_batch(batch)
        if self.label_shift and targets is not None and targets.ndim >= 2:
            targets = targets[:, self.label_shift :]
        return loss_weight(self.loss_function, targets, batch_size_of(inputs), exact=True)
