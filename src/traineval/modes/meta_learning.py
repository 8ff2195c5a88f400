"""Meta-learning mode: MAML, first-order MAML and Reptile over batches of few-shot tasks.

A batch is T tasks `(support_x, support_y, query_x, query_y)` with a leading task dimension
(`traineval.data.Episodes` under a DataLoader). For each task the model's weights are
adapted to the support set by `meta_inner_steps` SGD steps at `meta_inner_lr` (functionally,
with `torch.func.functional_call`: the model itself is not modified), then:

- `maml`: the loss is the adapted model's query loss, differentiated through the inner steps
  (second order; Finn et al., 2017);
- `fomaml`: the same loss, with the inner gradients treated as constants (first order);
- `reptile`: the gradient is `weights - adapted weights` (Nichol et al., 2018); the reported
  loss is the adapted model's query loss.

The step's loss averages over the batch's tasks and its gradient is the meta-gradient, so
the configured optimizer, schedule, clipping, accumulation (tasks weigh equally) and
checkpointing act on the meta-update like on any other. `evaluate` adapts the same way on
each validation task and scores the query predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..batches import OutputTransform, prediction_of
from ..config import META_ALGORITHMS
from ..distributed import Distributed
from .base import StepOutput, loss_with_gradient

__all__ = ["MetaLearningStep"]

Weights = dict[str, torch.Tensor]


class MetaLearningStep:
    """Step function for batches of few-shot tasks; see the module docstring."""

    def __init__(
        self,
        loss_function: Any = None,
        algorithm: str = "maml",
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        if algorithm not in META_ALGORITHMS:
            raise ValueError(
                f"meta_algorithm={algorithm!r} is invalid: expected one of {META_ALGORITHMS}"
            )
        self.loss_function = loss_function or F.cross_entropy
        self.algorithm = algorithm
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.output_transform = output_transform

    @classmethod
    def from_config(
        cls,
        config: Any,
        loss_function: Any = None,
        output_transform: OutputTransform | None = None,
    ) -> MetaLearningStep:
        """The step a TrainingConfig's `meta_*` settings describe."""
        c = config
        return cls(
            loss_function,
            c.meta_algorithm,
            c.meta_inner_lr,
            c.meta_inner_steps,
            output_transform=output_transform,
        )

    def weight(self, batch: Any) -> int:
        """Tasks weigh equally: the number of tasks in the batch."""
        return int(_tasks(batch)[0].shape[0])

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        support_x, support_y, query_x, query_y = _tasks(batch)
        weights, buffers = _split_state(model)
        tasks = support_x.shape[0]
        losses = []
        pseudo: list[torch.Tensor] = []  # reptile: summed (weights - adapted) over tasks
        for t in range(tasks):
            adapted = self.adapt(model, weights, buffers, support_x[t], support_y[t])
            query_loss = self.loss_function(
                self._predict(model, {**buffers, **adapted}, query_x[t]), query_y[t]
            )
            if self.algorithm == "reptile":
                pseudo = pseudo or [torch.zeros_like(w) for w in weights.values()]
                for total, w, a in zip(pseudo, weights.values(), adapted.values(), strict=True):
                    total.add_(w.detach() - a.detach())
                query_loss = query_loss.detach()
            losses.append(query_loss)
        loss = torch.stack(losses).mean()
        if self.algorithm == "reptile":
            # value: the adapted models' query loss; gradient: mean of (weights - adapted)
            loss = loss_with_gradient(loss, list(weights.values()), [d / tasks for d in pseudo])
        return StepOutput(loss=loss, weight=tasks, num_samples=tasks)

    def adapt(
        self,
        model: nn.Module,
        weights: Weights,
        buffers: Weights,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        create_graph: bool | None = None,
    ) -> Weights:
        """`weights` after the inner SGD steps on one task's support set."""
        second_order = self.algorithm == "maml" if create_graph is None else create_graph
        fast = dict(weights)
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                outputs = self._predict(model, {**buffers, **fast}, support_x)
                loss = self.loss_function(outputs, support_y)
                grads = torch.autograd.grad(
                    loss, list(fast.values()), create_graph=second_order, allow_unused=True
                )
            fast = {
                name: w if g is None else w - self.inner_lr * (g if second_order else g.detach())
                for (name, w), g in zip(fast.items(), grads, strict=True)
            }
            if self.algorithm == "reptile":
                fast = {name: w.detach().requires_grad_() for name, w in fast.items()}
        return fast

    def _predict(self, model: nn.Module, state: Weights, inputs: torch.Tensor) -> torch.Tensor:
        """The model's prediction with `state` in place of its weights (the loss and the
        accuracy read the prediction: see `traineval.batches`)."""
        return prediction_of(functional_call(model, state, (inputs,)), self.output_transform)

    def evaluate(
        self, model: nn.Module, loader: Any, device: torch.device, job: Distributed | None = None
    ) -> dict[str, float]:
        """Query loss and accuracy after adapting to each task's support set (under torchrun:
        over every rank's share of the tasks)."""
        was_training = model.training
        model.eval()
        weights, buffers = _split_state(model)
        loss_sum, correct, count = 0.0, 0, 0
        try:
            for batch in loader:
                support_x, support_y, query_x, query_y = (
                    t.to(device, non_blocking=True) for t in _tasks(batch)
                )
                for t in range(support_x.shape[0]):
                    adapted = self.adapt(
                        model, weights, buffers, support_x[t], support_y[t], create_graph=False
                    )
                    with torch.no_grad():
                        outputs = self._predict(model, {**buffers, **adapted}, query_x[t])
                        loss = self.loss_function(outputs, query_y[t])
                    n = int(query_y[t].shape[0])
                    loss_sum += float(loss) * n
                    correct += int((outputs.argmax(dim=-1) == query_y[t]).sum())
                    count += n
        finally:
            model.train(was_training)
        if job is not None:
            loss_sum, correct_sum, count_sum = job.sum([loss_sum, correct, count])
            correct, count = int(correct_sum), int(count_sum)
        if count == 0:
            raise ValueError("the validation loader yielded no tasks")
        return {"loss": loss_sum / count, "accuracy": correct / count}


def _split_state(model: nn.Module) -> tuple[Weights, Weights]:
    """The trainable weights, and everything else the forward pass reads (frozen, buffers)."""
    weights: Weights = {}
    others: Weights = dict(model.named_buffers())
    for name, param in model.named_parameters():
        (weights if param.requires_grad else others)[name] = param
    return weights, others


def _tasks(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 4:
        raise ValueError(
            "meta-learning batches are (support_x, support_y, query_x, query_y) with a leading "
            "task dimension, e.g. a DataLoader over traineval.data.Episodes; got "
            f"{type(batch).__name__}"
            + (f" of {len(batch)} elements" if isinstance(batch, (list, tuple)) else "")
        )
    support_x, support_y, query_x, query_y = batch
    if support_x.ndim < 2 or support_y.ndim != 2:
        raise ValueError(
            "meta-learning batches need a leading task dimension: support_y of shape "
            f"(tasks, samples), got {tuple(support_y.shape)}"
        )
    return support_x, support_y, query_x, query_y
