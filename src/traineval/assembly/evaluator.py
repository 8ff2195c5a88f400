"""The Evaluator (the specification's): the metric engine plus cross-validation.

Cross-validation trains a model per fold, so it sits above both evaluation and training:
`ModelEvaluator` (what training validates with) knows nothing of the trainer, and this
module adds the one method that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..config.training_config import TaskType, TrainingConfig, TrainingMode
from ..evaluation.model_evaluator import SCATTER_POINTS, SPLIT_PREFIX, ModelEvaluator
from .cross_validation import Folds, cross_validate

__all__ = ["SCATTER_POINTS", "SPLIT_PREFIX", "Evaluator"]


class Evaluator(ModelEvaluator):
    """Comprehensive model evaluator (the specification's `Evaluator`): task detection,
    streaming metrics, predictions, plots, ensembles, and cross-validation.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[2.0, 0.1], [0.2, 1.5], [1.0, 0.0]])
        >>> Evaluator().compute_metrics(scores, torch.tensor([0, 1, 1]))["accuracy"]
        0.6666666666666666
    """

    def cross_validate(
        self,
        model_class: Callable[[], nn.Module],
        train_dataset: Dataset[Any],
        config: TrainingConfig,
        n_folds: int = 5,
        *,
        stratify: bool | None = None,
        groups: Sequence[Any] | None = None,
        task_type: TaskType | None = None,
        loss_function: Any = None,
        training_mode: Any = TrainingMode.SUPERVISED,
        num_workers: int = 0,
        resume: bool = False,
    ) -> dict[str, Any]:
        """k-fold cross-validation (the specification's call shape): one fresh model per fold.

        `model_class` is a model class taking no arguments or any function returning a new
        model. Folds are stratified for classification unless `stratify=False`, grouped when
        `groups` is given (no group spans two folds; with stratification too, scikit-learn's
        `StratifiedGroupKFold`), plain otherwise, shuffled with `config.seed` (grouped folds
        without stratification are scikit-learn's `GroupKFold`, which does not shuffle).
        Every fold starts from fresh weights, optimizer, scheduler and callbacks, trains in
        `<output_dir>/fold-<k>/`, and reports its *best* validation metrics (at the
        monitored metric's best evaluation).

        Returns `<metric>_mean` and `<metric>_std` for every validation metric, plus `folds`
        (per-fold best metrics, epoch, checkpoint) and `fold_checkpoints` (for
        `evaluate_ensemble`); the same summary is written to `<output_dir>/cv_summary.json`.

        `resume=True` continues a cross-validation that a signal (or a crash) stopped, in
        `config.output_dir`: its finished folds are kept as they are, the stopped fold
        resumes from its last checkpoint, the rest train; the summary equals an
        uninterrupted run's. It is refused where the folds would hold other rows or the
        training config differs from the one the cross-validation began with.
        """
        request = Folds(
            self, model_class, train_dataset, config,
            task_type, loss_function, training_mode, num_workers, resume,
        )  # fmt: skip
        return cross_validate(request, n_folds, stratify, groups)
