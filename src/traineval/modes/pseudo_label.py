"""The pseudo-label step of semi-supervised mode (`algorithm="pseudo_label"`).

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

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..training.batches import OutputTransform, prediction_of
from .base import StepOutput, batch_size_of, forward, split_batch

__all__ = ["SemiSupervisedStep"]


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
        outputs = self._scores(forward(model, inputs))
        terms, rate = self.terms(outputs, targets)
        return self._output(terms, batch_size_of(inputs), outputs, targets, rate)

    def _scores(self, out: Any) -> torch.Tensor:
        """The `(N, classes)` scores in a model's output; a clear error for anything else."""
        scores = prediction_of(out, self.output_transform)
        if scores.ndim != 2:
            raise ValueError(
                "semi-supervised training needs (N, classes) scores from the model, got shape "
                f"{tuple(scores.shape)}"
            )
        return scores

    @staticmethod
    def _output(
        terms: torch.Tensor,
        num_samples: int,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        rate: torch.Tensor | None = None,
    ) -> StepOutput:
        """The step's output from its two terms (`[labeled mean, unlabeled term]`), with the
        share of unlabeled samples that passed the threshold, if the algorithm has one."""
        return StepOutput(
            loss=terms.sum(),
            weight=num_samples,
            num_samples=num_samples,
            outputs=outputs,
            targets=targets,
            metrics={"pseudo_label_rate": rate} if rate is not None else None,
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
