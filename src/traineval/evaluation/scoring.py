"""One evaluation batch through the model: its prediction, targets, loss and weight.

The rules are those of training (`traineval.training.batches`): the prediction is read from whatever
the model returns; a model that takes `labels` is scored with its own loss when no loss
function is given; a causal language model's prediction at position t is compared with the
label at t + 1, as its loss does; a loss function of your own that is not one of torch's gets
the model's output as it returned it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config.training_config import TaskType
from ..tasks import default_loss, scores_next_token
from ..training.batches import (
    ModelLoss,
    OutputTransform,
    batch_size_of,
    forward,
    label_shift,
    prediction_of,
    reads_prediction,
    shifted,
    split_batch,
    unsqueezed,
)
from ..training.steps import count_required_args, loss_weight


@dataclasses.dataclass
class Scored:
    """A batch after the model: what the metrics and the loss read."""

    prediction: torch.Tensor
    targets: torch.Tensor
    loss: torch.Tensor
    weight: int | torch.Tensor  # the items `loss` is a mean over


@dataclasses.dataclass
class _Forward:
    inputs: Any
    targets: Any
    outputs: Any
    own_loss: torch.Tensor | None  # the model's, when it computed one from the labels


class BatchScorer:
    """Runs the model on evaluation batches and scores them (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        loss_function: Any,
        *,
        unsupervised: bool,
        ignore_index: int,
        transform: OutputTransform | None,
    ) -> None:
        self.model = model
        self.loss_function = loss_function
        self.unsupervised = unsupervised
        self.ignore_index = ignore_index
        self.transform = transform
        use_own = loss_function is None and not unsupervised
        self.model_loss = ModelLoss.of(model) if use_own else None
        self.shift = 0 if unsupervised else label_shift(model)
        self._takes_targets = loss_function is None or count_required_args(loss_function) >= 2
        # item-weighted loss sums over the batches scored, on the device (read once, at the end)
        self._loss_sum: torch.Tensor | None = None
        self._weight_sum: torch.Tensor | None = None

    def forward(self, batch: Any) -> _Forward:
        """The model's output on `batch` (with its loss when it computes one)."""
        inputs, targets = split_batch(batch)
        if self.unsupervised:
            targets = inputs
        elif targets is None:
            raise ValueError("evaluation needs (inputs, targets) batches")
        if self.model_loss is not None and self.model_loss.applies(batch):
            outputs, own = self.model_loss(self.model, batch)
            return _Forward(inputs, targets, outputs, own)
        return _Forward(inputs, targets, forward(self.model, inputs), None)

    def pair(self, result: _Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """What the metrics compare: prediction and targets (shifted for a causal model)."""
        raw = unsqueezed(prediction_of(result.outputs, self.transform), result.inputs)
        return shifted(raw, result.targets, self.shift)

    def score(self, result: _Forward, task: TaskType) -> Scored:
        """The batch's prediction, targets, loss and weight, for the metrics of `task`; its
        loss is added to the sums `loss_totals` reads."""
        scored = self._score(result, task)
        loss = scored.loss.detach()
        if self._loss_sum is None or self._weight_sum is None:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._weight_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
        if isinstance(scored.weight, int):
            if scored.weight:  # a batch of no items (every target ignored): mean 0/0, NaN
                self._loss_sum.add_(loss, alpha=scored.weight)
        else:
            self._loss_sum.add_(torch.where(scored.weight > 0, loss * scored.weight, 0.0))
        self._weight_sum += scored.weight
        return scored

    def loss_totals(self) -> tuple[float, float]:
        """The item-weighted loss sum and the items, over every batch scored (a sync)."""
        if self._loss_sum is None or self._weight_sum is None:
            return 0.0, 0.0
        return float(self._loss_sum), float(self._weight_sum)

    def _score(self, result: _Forward, task: TaskType) -> Scored:
        raw = unsqueezed(prediction_of(result.outputs, self.transform), result.inputs)
        prediction, targets = shifted(raw, result.targets, self.shift)
        if result.own_loss is not None:
            assert self.model_loss is not None
            weight = self.model_loss.items(result.targets, exact=True)
            return Scored(prediction, targets, result.own_loss, weight)
        loss_function = self._loss_function(task)
        if scores_next_token(loss_function):
            pair = (prediction, targets)  # the default loss scores what the metrics score
        elif reads_prediction(loss_function):
            pair = (raw, result.targets)
        else:
            pair = (result.outputs, result.targets)
        loss = loss_function(*pair) if self._takes_targets else loss_function(pair[0])
        n = batch_size_of(result.inputs)
        return Scored(prediction, targets, loss, loss_weight(loss_function, pair[1], n, exact=True))

    def _loss_function(self, task: TaskType) -> Any:
        if self.loss_function is None:
            self.loss_function = default_loss(task, self.ignore_index)
            self._takes_targets = count_required_args(self.loss_function) >= 2
        return self.loss_function
