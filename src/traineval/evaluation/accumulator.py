"""The streaming metric state of one evaluation: the task's built-in states, the user's
metrics, bootstrap samples and scatter points, merged across ranks in rank order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config.training_config import EvaluationConfig, TaskType
from ..tasks import align_regression
from .bootstrap import Bootstrap, classification_intervals, regression_intervals
from .metrics import (
    ConfusionMatrix,
    MultilabelStats,
    ProbabilityStats,
    RegressionStats,
    TokenStats,
    say_if_sigmoided,
)
from .user_metrics import UserMetric

SCATTER_POINTS = 10_000  # predicted-vs-actual plots keep this many points, not all


class Accumulator:
    """The streaming metric state of one task."""

    def __init__(self, task: TaskType, config: EvaluationConfig, keep_curve: bool) -> None:
        self.task = task
        self.config = config
        self.keep_curve = keep_curve and config.plot_metrics
        self.confusion: ConfusionMatrix | None = None
        self.scores: ProbabilityStats | None = None
        self.regression = RegressionStats() if task is TaskType.REGRESSION else None
        self.tokens = TokenStats(config.ignore_index) if task is TaskType.GENERATION else None
        ranked = {"roc_auc", "average_precision"} & set(config.multilabel_metrics)
        self.multilabel = (
            MultilabelStats(config.multilabel_threshold, keep_scores=bool(ranked))
            if task is TaskType.MULTILABEL
            else None
        )
        self.scatter: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            [] if self.keep_curve and task is TaskType.REGRESSION else None
        )
        self._scattered = 0
        # every (prediction, target), on the device until the end: bootstrap intervals
        resampled = (TaskType.CLASSIFICATION, TaskType.REGRESSION)
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            [] if config.bootstrap_samples and task in resampled else None
        )
        self.user: list[UserMetric] = []  # the user's metrics, fresh for this evaluation

    def start_user_metrics(self, user: Sequence[UserMetric]) -> None:
        self.user = [metric.start(self.config.multilabel_threshold) for metric in user]

    def adopt_user_metrics(self, local: Sequence[UserMetric]) -> None:
        for metric, mine in zip(self.user, local, strict=True):
            metric.adopt(mine)

    def _update_user(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The user's metrics see the task's predictions, without ignored targets."""
        if self.task is TaskType.CLASSIFICATION and targets.ndim == 1:
            kept = targets != self.config.ignore_index
            if not bool(kept.all()):
                outputs, targets = outputs[kept], targets[kept]
        if targets.numel() == 0:  # every target of the batch ignored
            return
        for metric in self.user:
            metric.update(outputs, targets, self.task)

    def user_values(self) -> dict[str, float]:
        return {m.name: m.compute(self.config.ignore_index) for m in self.user}

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        # a model that squeezes its output gives a 0-d tensor for a batch of one sample
        outputs, targets = torch.atleast_1d(outputs), torch.atleast_1d(targets)
        if self.user:
            self._update_user(outputs, targets)
        if self.task is TaskType.CLASSIFICATION:
            self._update_classification(outputs, targets)
        elif self.regression is not None:
            self._update_regression(outputs, targets)
        elif self.tokens is not None:
            self.tokens.update(outputs, targets)
        elif self.multilabel is not None:
            if self.multilabel.counts is None:  # its first batch
                say_if_sigmoided(outputs)
            self.multilabel.update(outputs, targets)

    def _update_classification(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.confusion is None:
            if outputs.ndim == 1 or outputs.shape[1] == 1:  # one logit a sample
                say_if_sigmoided(outputs)
            self._start_classification(outputs)
        assert self.confusion is not None
        self.confusion.update(outputs, targets)
        if self.scores is not None:
            self.scores.update(outputs, targets)
        if self.samples is not None:
            binary = outputs.ndim == 1 or outputs.shape[1] == 1
            chosen = (outputs.reshape(-1) > 0).long() if binary else outputs.argmax(dim=1)
            self.samples.append((chosen.detach(), targets.reshape(-1).detach()))

    def _update_regression(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        assert self.regression is not None
        if targets.shape[0] != outputs.shape[0]:
            raise ValueError(
                f"{outputs.shape[0]} predictions but {targets.shape[0]} targets in a batch"
            )
        self.regression.update(outputs, targets)
        if self.samples is not None:
            aligned = align_regression(outputs, targets).reshape(targets.shape[0], -1)
            self.samples.append((aligned.detach(), targets.reshape(targets.shape[0], -1)))
        if self.scatter is not None and self._scattered < SCATTER_POINTS:
            take = SCATTER_POINTS - self._scattered
            self.scatter.append(
                (outputs.reshape(-1)[:take].cpu(), targets.reshape(-1)[:take].cpu())
            )
            self._scattered += min(take, outputs.numel())

    def _start_classification(self, outputs: torch.Tensor) -> None:
        classes = outputs.shape[1] if outputs.ndim == 2 and outputs.shape[1] > 1 else 2
        self.confusion = ConfusionMatrix(classes, self.config.ignore_index)
        names = set(self.config.classification_metrics)
        calibration = names & {"brier_score", "ece"}
        if names & {"log_loss", "top_k_accuracy", "roc_auc"} or calibration or self.keep_curve:
            keep = "roc_auc" in names or (self.keep_curve and classes == 2)
            self.scores = ProbabilityStats(
                classes,
                self.config.top_k,
                keep,
                self.config.ignore_index,
                self.config.calibration_bins if calibration else 0,
            )

    def merge(self, other: Accumulator) -> None:
        """Fold in another shard's state (another rank's), as if one had seen both."""
        for name in ("confusion", "scores", "regression", "tokens", "multilabel"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is None:
                continue
            if mine is None:
                setattr(self, name, theirs)
            else:
                mine.merge(theirs)
        if self.scatter is not None and other.scatter:
            self.scatter.extend(other.scatter)
            self._scattered += other._scattered
        if self.samples is not None and other.samples:
            self.samples.extend(other.samples)
        for mine, theirs in zip(self.user, other.user, strict=True):
            mine.merge(theirs)

    def compute(self, average: str) -> dict[str, float]:
        if self.confusion is not None:
            out = self.confusion.compute(average)
            if self.scores is not None:
                out.update(self.scores.compute(average))
            return out
        if self.regression is not None:
            return self.regression.compute()
        if self.multilabel is not None:
            return self.multilabel.compute(average)
        assert self.tokens is not None
        return self.tokens.compute()

    def intervals(self, average: str) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of the metrics (`EvaluationConfig.bootstrap_samples`)."""
        c = self.config
        if not c.bootstrap_samples:
            return {}
        bootstrap = Bootstrap(c.bootstrap_samples, c.confidence_level, c.bootstrap_seed)
        found: dict[str, tuple[float, float]] = {}
        for metric in self.user:
            interval = metric.interval(c.ignore_index, bootstrap)
            if interval is not None:
                found[metric.name] = interval
        return {**self._built_in_intervals(average, bootstrap), **found}

    def _built_in_intervals(
        self, average: str, bootstrap: Bootstrap
    ) -> dict[str, tuple[float, float]]:
        """The built-in metrics' intervals over the kept (prediction, target) pairs."""
        if not self.samples:
            return {}
        predictions = torch.cat([p.cpu() for p, _ in self.samples]).numpy()
        targets = torch.cat([t.cpu() for _, t in self.samples]).numpy()
        if self.confusion is not None:
            kept = targets != self.config.ignore_index
            classes = self.confusion.num_classes
            return classification_intervals(
                targets[kept], predictions[kept], classes, average, bootstrap
            )
        return regression_intervals(predictions, targets, bootstrap)

    def scatter_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.scatter
        predictions = torch.cat([p for p, _ in self.scatter]).numpy()
        targets = torch.cat([t for _, t in self.scatter]).numpy()
        return predictions, targets
