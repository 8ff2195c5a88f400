"""Consistency-based semi-supervised steps: FixMatch and Mean Teacher.

Both take the semi-supervised mode's batches (inputs, class ids; `unlabeled_label` marks
the unlabeled samples) and a weak / strong augmentation pair (functions on a batch, e.g.
`traineval.data.augment`), and report their two terms apart (`StepOutput.terms`: the labeled
mean and the unlabeled one) so accumulation and DDP stay exact, as the pseudo-label step.

FixMatch (Sohn et al., 2020), with one forward pass over the weak and the strong views:

    mean CE(f(weak(x_l)), y_l)
    + unlabeled_weight * (1 / n_u) * sum_u 1[max p(weak(x_u)) >= threshold]
      * CE(f(strong(x_u)), argmax p(weak(x_u)))

Mean Teacher (Tarvainen and Valpola, 2017): the teacher is the exponential moving average
of the weights the loop keeps (`ema_decay`; it evaluates and checkpoints with it too):

    mean CE(f(weak(x_l)), y_l)
    + unlabeled_weight * ramp(t) * (1 / n_u) * sum_u mean_k (softmax f(weak(x_u))
      - softmax f_teacher(weak'(x_u)))_k^2

with two independent weak draws and `ramp(t) = exp(-5 (1 - min(t / rampup_steps, 1))^2)`
over the optimizer updates t (1 without a ramp-up).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..training.batches import OutputTransform
from .base import StepOutput, batch_size_of, forward
from .pseudo_label import SemiSupervisedStep

__all__ = ["FixMatchStep", "MeanTeacherStep"]

Augmentation = Callable[[torch.Tensor], torch.Tensor]


def _tensor_inputs(inputs: Any, algorithm: str) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(
            f"algorithm={algorithm!r} augments the inputs: it needs a tensor of inputs per "
            f"batch, got {type(inputs).__name__}"
        )
    return inputs


class FixMatchStep(SemiSupervisedStep):
    """FixMatch's step; see the module docstring."""

    def __init__(
        self,
        weak: Augmentation,
        strong: Augmentation,
        unlabeled_label: int = -1,
        unlabeled_weight: float = 1.0,
        threshold: float = 0.95,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        super().__init__(
            unlabeled_label, unlabeled_weight, threshold, output_transform=output_transform
        )
        self.weak, self.strong = weak, strong

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, targets = self._split(batch)
        x = _tensor_inputs(inputs, "fixmatch")
        n = batch_size_of(x)
        with torch.no_grad():
            views = torch.cat([self.weak(x), self.strong(x)])
        scores = self._scores(forward(model, views))
        weak, strong = scores[:n], scores[n:]
        unlabeled = targets == self.unlabeled_label
        with torch.no_grad():
            confidence, pseudo = weak.detach().float().softmax(dim=1).max(dim=1)
            kept = unlabeled & (confidence >= self.threshold)
            counts = self._counts(unlabeled).clamp(min=1)
        labeled = F.cross_entropy(weak, torch.where(unlabeled, 0, targets), reduction="none")
        consistency = F.cross_entropy(strong, pseudo, reduction="none")
        terms = torch.stack(
            [(labeled * ~unlabeled).sum(), (consistency * kept).sum() * self.unlabeled_weight]
        )
        return self._output(terms / counts, n, weak, targets, kept.sum() / counts[1])


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper or torch.compile holds."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class MeanTeacherStep(SemiSupervisedStep):
    """Mean Teacher's step; the loop's moving average of the weights is the teacher
    (`use_weight_average`). See the module docstring."""

    def __init__(
        self,
        weak: Augmentation,
        unlabeled_label: int = -1,
        unlabeled_weight: float = 1.0,
        rampup_steps: int = 0,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        super().__init__(unlabeled_label, unlabeled_weight, 0.0, output_transform=output_transform)
        self.weak = weak
        self.rampup_steps = rampup_steps
        self.teacher: Any = None

    def use_weight_average(self, average: Any) -> None:
        """Take the loop's moving average of the weights as the teacher."""
        self.teacher = average

    def ramp(self) -> float:
        """The consistency weight's ramp-up factor at the current update."""
        if not self.rampup_steps:
            return 1.0
        progress = min(self.teacher.updates / self.rampup_steps, 1.0)
        return float(torch.tensor(-5.0 * (1.0 - progress) ** 2).exp())

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        if self.teacher is None:
            raise ValueError(
                "mode.algorithm='mean_teacher' takes its teacher from the moving average of "
                "the weights: set training.ema_decay (e.g. 0.99)"
            )
        inputs, targets = self._split(batch)
        x = _tensor_inputs(inputs, "mean_teacher")
        n = batch_size_of(x)
        with torch.no_grad():
            student_view, teacher_view = self.weak(x), self.weak(x)
            teacher = functional_call(_unwrapped(model), self.teacher.tensors(), (teacher_view,))
            target = self._scores(teacher).float().softmax(dim=1)
        scores = self._scores(forward(model, student_view))
        unlabeled = targets == self.unlabeled_label
        with torch.no_grad():
            counts = self._counts(unlabeled).clamp(min=1)
        labeled = F.cross_entropy(scores, torch.where(unlabeled, 0, targets), reduction="none")
        consistency = ((scores.float().softmax(dim=1) - target) ** 2).mean(dim=1)
        weight = self.unlabeled_weight * self.ramp()
        terms = torch.stack(
            [(labeled * ~unlabeled).sum(), (consistency * unlabeled).sum() * weight]
        )
        return self._output(terms / counts, n, scores, targets)
