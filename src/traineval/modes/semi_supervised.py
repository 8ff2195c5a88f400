"""Semi-supervised mode: labeled and unlabeled samples in one batch, pseudo-labels for the latter.

Unlabeled samples carry the target `unlabeled_label` (-1 by default, scikit-learn's
convention in `sklearn.semi_supervised`). Each micro-batch's loss is

    mean cross-entropy over its labeled samples
    + unlabeled_weight * (1 / n_unlabeled) * sum over its unlabeled samples whose top
      predicted probability is >= pseudo_label_threshold of the cross-entropy against
      that (detached) top class

i.e. pseudo-labelling (Lee, 2013) with FixMatch's confidence mask and normalisation
(Sohn et al., 2020), without augmentations: pass augmented inputs through your dataset.
Masks and counts stay on the device (no host sync per step). The two terms are means over
different sets (labeled / unlabeled samples), so the step reports them apart
(`StepOutput.terms`) with their counts (`weight()`): under gradient accumulation and DDP each
is normalised by the whole window's (all ranks') count of its samples, and the gradient equals
that of one big batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..batches import OutputTransform, prediction_of
from ..checks import fail, number
from .base import StepOutput, batch_size_of, forward, split_batch
from .contract import Context, Mode, ModePlan, register


@register
@dataclasses.dataclass(frozen=True)
class SemiSupervised(Mode):
    """Classification batches where targets equal to `unlabeled_label` mark unlabeled
    samples; they train on confident pseudo-labels (`traineval.modes.semi_supervised`).

    Settings: `unlabeled_label` (a negative integer), `unlabeled_weight` (the pseudo-label
    term's weight), `pseudo_label_threshold` (the top probability a pseudo-label needs).
    """

    name: ClassVar[str] = "semi_supervised"
    unlabeled_label: int = -1
    unlabeled_weight: float = 1.0
    pseudo_label_threshold: float = 0.95

    def __post_init__(self) -> None:
        label = self.unlabeled_label
        if isinstance(label, bool) or not isinstance(label, int) or label >= 0:
            fail(
                self.key("unlabeled_label"),
                self.unlabeled_label,
                "expected a negative integer (class ids are >= 0)",
            )
        number(self.key("unlabeled_weight"), self.unlabeled_weight, minimum=0.0)
        number(self.key("pseudo_label_threshold"), self.pseudo_label_threshold, minimum=0.0)
        if self.pseudo_label_threshold > 1.0:
            fail(
                self.key("pseudo_label_threshold"),
                self.pseudo_label_threshold,
                "expected a number in [0, 1]",
            )

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.user_loss:
            raise ValueError(
                "loss_function is not used in mode='semi_supervised': it trains with "
                "cross-entropy on the labeled samples plus the pseudo-label term; leave "
                "loss_function None"
            )

    def plan(self, ctx: Context) -> ModePlan:
        return ModePlan(
            SemiSupervisedStep(
                self.unlabeled_label,
                self.unlabeled_weight,
                self.pseudo_label_threshold,
                output_transform=ctx.output_transform,
            )
        )


class SemiSupervisedStep:
    """Step function for classification batches where some targets are `unlabeled_label`."""

    def __init__(
        self,
        unlabeled_label: int = -1,
        unlabeled_weight: float = 1.0,
        threshold: float = 0.95,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        self.output_transform = output_transform
        self.unlabeled_label = unlabeled_label
        self.unlabeled_weight = unlabeled_weight
        self.threshold = threshold

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, targets = self._split(batch)
        outputs = prediction_of(forward(model, inputs), self.output_transform)
        if outputs.ndim != 2:
            raise ValueError(
                "semi-supervised training needs (N, classes) scores from the model, got shape "
                f"{tuple(outputs.shape)}"
            )
        terms, rate = self.terms(outputs, targets)
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=terms.sum(),
            weight=num_samples,
            num_samples=num_samples,
            outputs=outputs,
            targets=targets,
            metrics={"pseudo_label_rate": rate},
            terms=terms,
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The labeled term plus the weighted, confidence-masked pseudo-label term."""
        return self.terms(outputs, targets)[0].sum()

    def terms(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms, `[labeled mean, unlabeled_weight * pseudo-label sum / unlabeled
        count]`, and the share of unlabeled samples that passed the threshold (a device
        tensor, logged as `train_pseudo_label_rate`)."""
        unlabeled = targets == self.unlabeled_label
        with torch.no_grad():
            confidence, pseudo = outputs.detach().float().softmax(dim=1).max(dim=1)
            kept = unlabeled & (confidence >= self.threshold)
            counts = self._counts(unlabeled).clamp(min=1)
        per_sample = F.cross_entropy(
            outputs, torch.where(unlabeled, pseudo, targets), reduction="none"
        )
        labeled_sum = (per_sample * ~unlabeled).sum()
        pseudo_sum = (per_sample * kept).sum() * self.unlabeled_weight
        terms = torch.stack([labeled_sum, pseudo_sum]) / counts
        return terms, kept.sum() / counts[1]

    def weight(self, batch: Any) -> torch.Tensor:
        """The micro-batch's labeled and unlabeled sample counts (device tensors, no sync):
        each loss term is normalised by its own count over the window."""
        return self._counts(self._split(batch)[1] == self.unlabeled_label)

    @staticmethod
    def _counts(unlabeled: torch.Tensor) -> torch.Tensor:
        n_unlabeled = unlabeled.sum()
        return torch.stack([unlabeled.numel() - n_unlabeled, n_unlabeled])

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        inputs, targets = split_batch(batch)
        if targets is None or targets.is_floating_point() or targets.ndim != 1:
            raise ValueError(
                "semi-supervised training needs (inputs, class ids) batches with "
                f"{self.unlabeled_label} marking the unlabeled samples; got targets "
                + (
                    "none"
                    if targets is None
                    else f"{targets.dtype} of shape {tuple(targets.shape)}"
                )
            )
        return inputs, targets
