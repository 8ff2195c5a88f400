"""k-fold cross-validation of deep models: fresh state per fold, best (not last) metrics."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config.training_config import TaskType, TrainingConfig
from ..data.splits import dataset_labels
from ..evaluation.model_evaluator import ModelEvaluator
from ..modes import resolve_mode
from ..runs.rundir import CV_SUMMARY, run_dir_lock
from ..system.files import atomic_write_json
from ..system.seeding import seed_everything
from .manager import TrainingManager

logger = logging.getLogger(__name__)


def make_folds(
    n_samples: int,
    n_folds: int,
    *,
    labels: np.ndarray | None = None,
    groups: Sequence[Any] | None = None,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs, shuffled with `seed`: grouped if `groups` (no group
    in two folds; scikit-learn's `GroupKFold`), also stratified if `labels` (its
    `StratifiedGroupKFold`), stratified if `labels` alone, else plain."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r} (--folds) is invalid: expected an integer >= 2")
    if n_folds > n_samples:
        raise ValueError(
            f"n_folds={n_folds} (--folds) is invalid: the dataset has {n_samples} samples"
        )
    indices = np.arange(n_samples)
    if groups is not None:
        group_array = np.asarray(groups)
        if len(group_array) != n_samples:
            raise ValueError(f"groups has {len(group_array)} entries for {n_samples} samples")
        distinct = len(set(group_array.tolist()))
        if distinct < n_folds:
            raise ValueError(f"n_folds={n_folds} (--folds) is more than the {distinct} groups")
        if labels is not None:  # each fold's classes as near the whole set's as groups allow
            both = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            return list(both.split(indices, labels, groups=group_array))
        grouped = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(grouped.split(indices, groups=group_array))
    if labels is not None:
        smallest = np.unique(labels, return_counts=True)[1].min()  # any ids, e.g. -1: unlabeled
        if smallest < n_folds:
            raise ValueError(
                f"n_folds={n_folds} (--folds) is invalid for stratified folds: a class has "
                f"only {smallest} samples; use fewer folds (or, in Python, stratify=False)"
            )
        folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(folds.split(indices, labels))
    return list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(indices))


@dataclasses.dataclass
class FoldResult:
    fold: int
    best_metrics: dict[str, float]
    best_epoch: int | None
    checkpoint: str | None
    output_dir: str
    validation_size: int


def cross_validate(
    request: Folds, n_folds: int, stratify: bool | None, groups: Sequence[Any] | None
) -> dict[str, Any]:
    """Train and validate one fresh model per fold of `request`; aggregate each fold's best
    metrics. See `Evaluator.cross_validate`."""
    config = request.config
    request.mode = resolve_mode(request.mode, config)
    if config.max_time is not None:  # a fold stopped by it would be scored as if finished
        raise ValueError(
            f"max_time={config.max_time!r} is not supported in cross-validation: every fold "
            "trains to its end (cross-validation does not resume); leave max_time out"
        )
    if not callable(request.model_factory):
        raise TypeError("model_factory must be a model class or a function returning a model")
    folds = request.split(n_folds, stratify, groups)
    base = Path(config.output_dir) if config.output_dir else TrainingManager(config).output_dir
    with run_dir_lock(base):  # one cross-validation per folder
        _claim_folds(base, len(folds), config.overwrite_output_dir)
        try:
            results = request.train(folds, base)
        except BaseException:  # the earlier cross-validation's extra folds come back
            for folder in sorted((base / FOLDS_ASIDE).glob("fold-*")):
                folder.rename(base / folder.name)
            raise
        finally:
            shutil.rmtree(base / FOLDS_ASIDE, ignore_errors=True)
        summary = aggregate(results)
        summary["output_dir"] = str(base)
        atomic_write_json(base / CV_SUMMARY, summary)
    return summary


def _claim_folds(base: Path, n_folds: int, overwrite: bool) -> None:
    """An earlier cross-validation's folds in `base` are refused (cross-validation does not
    resume), or with `overwrite` replaced: fold folders beyond this run's `n_folds` are
    set aside until the new folds have trained (each fold's own folder is overwritten as a
    run's is)."""
    earlier = sorted(
        folder
        for folder in base.glob("fold-*")
        if folder.is_dir() and any((folder / "checkpoints").glob("*"))
    )
    if earlier and not overwrite:
        names = ", ".join(folder.name for folder in earlier[:4])
        raise FileExistsError(
            f"output_dir={str(base)!r} already holds an earlier cross-validation's folds "
            f"({names}); cross-validation does not resume: choose another output_dir, or "
            "set overwrite_output_dir=true (CLI: training.overwrite_output_dir=true)"
        )
    for folder in earlier:  # set aside: dropped once the new folds trained
        if folder.name not in {f"fold-{k}" for k in range(1, n_folds + 1)}:
            (base / FOLDS_ASIDE).mkdir(exist_ok=True)
            folder.rename(base / FOLDS_ASIDE / folder.name)


FOLDS_ASIDE = ".overwritten-folds"


@dataclasses.dataclass
class Folds:
    """What a cross-validation trains: the caller's objects, as given."""

    evaluator: ModelEvaluator
    model_factory: Callable[[], nn.Module]
    dataset: Dataset[Any]
    config: TrainingConfig
    task_type: TaskType | None
    loss_function: Any
    mode: Any
    num_workers: int = 0

    def split(
        self, n_folds: int, stratify: bool | None, groups: Sequence[Any] | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The folds: stratified for classification unless told otherwise, grouped when
        `groups` is given (both: stratified within the grouping); then shaped by the mode's
        `fold` (semi-supervised: a fold's unlabeled rows train with the other folds, since
        validation needs labels)."""
        dataset, task_type, mode = self.dataset, self.task_type, self.mode
        guessed = task_type is None and mode.name == "supervised" and _integer_targets(dataset)
        classification = task_type is TaskType.CLASSIFICATION or guessed
        if stratify and not classification:
            raise ValueError("stratify=True needs classification targets")
        use_strata = classification if stratify is None else stratify
        labels = dataset_labels(dataset) if use_strata else None
        if guessed and labels is not None and groups is None:
            _refuse_small_guessed_classes(labels, n_folds)
        n = len(dataset)  # type: ignore[arg-type]
        folds = make_folds(n, n_folds, labels=labels, groups=groups, seed=self.config.seed)
        return mode.fold(dataset, folds)

    def train(self, folds: list[tuple[np.ndarray, np.ndarray]], base: Path) -> list[FoldResult]:
        """One fresh model per fold, each from the same initial weights (the config's seed,
        whatever the caller's random state), trained into `base/fold-<k>`."""
        config = self.config
        results: list[FoldResult] = []
        for k, (train_idx, val_idx) in enumerate(folds, start=1):
            logger.info("Training fold %d/%d", k, len(folds))
            fold_config = config.replace(output_dir=str(base / f"fold-{k}"))
            seed_everything(config.seed)  # every fold starts from the same weights
            model = self.model_factory()
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_factory returned {type(model).__name__}, not an nn.Module")
            train_loader, val_loader = _fold_loaders(
                self.dataset, (train_idx, val_idx), config, config.seed + k, self.num_workers
            )
            result = TrainingManager(fold_config).train(
                model,
                train_loader,
                val_loader,
                task_type=self.task_type,
                loss_function=self.loss_function,
                evaluator=self.evaluator.fresh(),  # fresh state per fold
                mode=self.mode,
            )
            results.append(_fold_result(k, result, len(val_idx)))
        return results


def _fold_result(fold: int, result: Any, validation_size: int) -> FoldResult:
    return FoldResult(
        fold=fold,
        best_metrics=_best_metrics(result),
        best_epoch=result.best_epoch,
        checkpoint=result.checkpoints.get("best"),
        output_dir=result.output_dir,
        validation_size=validation_size,
    )


def _fold_loaders(
    dataset: Dataset[Any],
    split: tuple[np.ndarray, np.ndarray],
    config: TrainingConfig,
    seed: int,
    num_workers: int,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """A fold's shuffled train loader (its own seeded generator) and its val loader."""
    train_idx, val_idx = split
    train_loader = DataLoader(
        Subset(dataset, train_idx.tolist()),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
    val_loader = DataLoader(
        Subset(dataset, val_idx.tolist()),
        batch_size=config.effective_eval_batch_size,
        num_workers=num_workers,
    )
    return train_loader, val_loader


def _best_metrics(result: Any) -> dict[str, Any]:
    """A fold's validation metrics at its monitored metric's best evaluation."""
    history = result.training_history
    if result.best_step in history["val_steps"]:
        return dict(history["val_metrics"][history["val_steps"].index(result.best_step)])
    # monitored on train_loss: the evaluation of the best epoch
    return dict(history["val_metrics"][history["epoch"].index(result.best_epoch)])


def aggregate(results: Sequence[FoldResult]) -> dict[str, Any]:
    """`<metric>_mean` and `<metric>_std` (population std) plus per-fold values."""
    names = list(results[0].best_metrics)
    summary: dict[str, Any] = {}
    for name in names:
        values = [r.best_metrics[name] for r in results]
        summary[f"{name}_mean"] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values))
    summary["folds"] = [dataclasses.asdict(r) for r in results]
    summary["fold_checkpoints"] = [r.checkpoint for r in results]
    return summary


def _refuse_small_guessed_classes(labels: np.ndarray, n_folds: int) -> None:
    """Integer targets read as classes (no task_type given) with a class too small to
    stratify: they may be values to regress (counts), where fewer folds cannot help, so
    the error names both ways out."""
    values, counts = np.unique(labels, return_counts=True)
    if isinstance(n_folds, int) and counts.min() < n_folds:
        raise ValueError(
            f"n_folds={n_folds} (--folds) is invalid for stratified folds: the integer "
            f"targets were read as {len(values)} classes and class {values[counts.argmin()]} "
            f"has only {counts.min()} samples; if they are values to regress, pass "
            "task_type='regression' (or float targets), else use fewer folds"
        )


def _integer_targets(dataset: Dataset[Any]) -> bool:
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        return False
    target = first[1]
    if isinstance(target, torch.Tensor):
        return not target.is_floating_point() and target.numel() == 1
    return isinstance(target, (int, np.integer))
