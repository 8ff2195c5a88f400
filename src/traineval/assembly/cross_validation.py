"""k-fold cross-validation of deep models: fresh state per fold, best (not last) metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..config.training_config import RUN_ONLY_FIELDS, TaskType, TrainingConfig
from ..data.splits import dataset_labels
from ..evaluation.model_evaluator import ModelEvaluator
from ..modes import resolve_mode
from ..runs.rundir import CV_PLAN, CV_SUMMARY, holds_training_run, run_dir_lock
from ..system.files import atomic_write_json, atomic_write_text, read_json_or_none
from ..system.seeding import seed_everything
from ..training.stopping import TrainingInterrupted
from . import execution
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
            "trains to its end in one command; leave max_time out (a cross-validation "
            "stopped by a signal resumes with resume=True, --resume auto)"
        )
    _check_request(request)
    folds = request.split(n_folds, stratify, groups)
    base = Path(config.output_dir) if config.output_dir else TrainingManager(config).output_dir
    with run_dir_lock(base):  # one cross-validation per folder
        if holds_training_run(base):  # its config.yaml would become the folds'
            raise FileExistsError(
                f"output_dir={str(base)!r} holds a training run (its checkpoints or "
                "summary.json), not a cross-validation: choose another output_dir"
            )
        plan = fold_plan(request, folds)
        if request.resume:
            plan["id"] = check_plan(base, plan)  # the folds it began carry its id
        else:
            _claim_folds(base, len(folds), config.overwrite_output_dir)
            plan["id"] = secrets.token_hex(8)
        atomic_write_json(base / CV_PLAN, plan)  # what a resume must find the same
        try:
            results = request.train(folds, base, plan["id"])
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


def _check_request(request: Folds) -> None:
    """Refuse a model factory that is not one, and a resume that names no folder or also
    asks to overwrite it."""
    config = request.config
    if not callable(request.model_factory):
        raise TypeError("model_factory must be a model class or a function returning a model")
    if request.resume and not config.output_dir:
        raise ValueError(
            "resume=True (--resume auto) needs the stopped cross-validation's folder: set "
            "output_dir to it"
        )
    if request.resume and config.overwrite_output_dir:
        raise ValueError(
            "resume=True (--resume auto) continues the cross-validation in output_dir, and "
            "overwrite_output_dir=true replaces it: set one of them"
        )


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
            f"({names}): continue it with resume=True (CLI: --resume auto), choose another "
            "output_dir, or set overwrite_output_dir=true (CLI: "
            "training.overwrite_output_dir=true)"
        )
    for folder in earlier:  # set aside: dropped once the new folds trained
        if folder.name not in {f"fold-{k}" for k in range(1, n_folds + 1)}:
            (base / FOLDS_ASIDE).mkdir(exist_ok=True)
            folder.rename(base / FOLDS_ASIDE / folder.name)


FOLDS_ASIDE = ".overwritten-folds"


def fold_plan(request: Folds, folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """What a resume must find the same: the number of folds, each fold's rows (a digest
    of its train and validation indices), the training config but for how a run is shown
    and where it runs (folds trained otherwise would be scored together), and the
    command's config sections (`request.recorded`)."""
    import hashlib

    def digest(indices: np.ndarray) -> str:
        return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]

    training = {k: v for k, v in request.config.to_dict().items() if k not in RUN_ONLY_FIELDS}
    recorded = {"training": training, **(request.recorded or {})}
    return {
        "folds": len(folds),
        "rows": [[digest(train), digest(val)] for train, val in folds],
        "data": data_digest(request.dataset),
        "config": json.loads(json.dumps(recorded, default=repr)),  # as the file holds it
    }


def data_digest(dataset: Any) -> str | None:
    """A digest of a TensorDataset's values (a table's features and targets: an edited
    table of the same size folds into the same indices); None for a dataset of your own,
    which is compared by its folds alone."""
    import hashlib

    tensors = getattr(dataset, "tensors", None)
    if not isinstance(dataset, TensorDataset) or not tensors:
        return None
    digest = hashlib.sha256()
    try:
        for tensor in tensors:
            values = tensor.detach().cpu().resolve_conj().resolve_neg()
            values = (values.to_dense() if values.layout != torch.strided else values).contiguous()
            digest.update(f"{tuple(values.shape)} {values.dtype}".encode())
            digest.update(values.view(-1).view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError):  # a layout or dtype without plain bytes: by folds alone
        return None
    return digest.hexdigest()[:16]


def check_plan(base: Path, plan: dict[str, Any]) -> str:
    """Refuse to resume the cross-validation in `base` with other folds or config than it
    began with (each fold would continue on other rows); returns its id (a new one where
    there is nothing to resume: a fresh start, said once)."""
    earlier = read_json_or_none(base / CV_PLAN)
    if earlier is None or not isinstance(earlier.get("id"), str):
        if (base / CV_PLAN).exists():
            raise ValueError(
                f"{str(base / CV_PLAN)!r} cannot be read as a cross-validation's plan: the "
                "cross-validation cannot be continued; choose another output_dir, or set "
                "overwrite_output_dir=true"
            )
        if any(base.glob("fold-*/checkpoints/*")):
            raise ValueError(
                f"output_dir={str(base)!r} holds folds but no {CV_PLAN} (written by a "
                "cross-validation since it can resume): it cannot be continued; choose "
                "another output_dir, or set overwrite_output_dir=true"
            )
        logger.warning("no cross-validation to resume in %s: starting one", base)
        return secrets.token_hex(8)
    why = ""
    if earlier.get("folds") != plan["folds"]:
        why = f"n_folds={plan['folds']} (--folds), it began with {earlier.get('folds')}"
    elif earlier.get("rows") != plan["rows"]:
        why = "its folds hold other rows (another dataset, seed, stratification or groups)"
    elif None not in (earlier.get("data"), plan["data"]) and earlier["data"] != plan["data"]:
        why = "the data's values differ from those it began with (the table changed)"
    elif earlier.get("config") != plan["config"]:
        differ = first_differences(earlier.get("config") or {}, plan["config"] or {})
        verb = "differs" if len(differ) < 2 else "differ"
        named = ", ".join(differ[:3]) + (" ..." if len(differ) > 3 else "")
        why = f"{named or 'its config'} {verb} from what it began with"
    if why:
        raise ValueError(
            f"cannot resume the cross-validation in {str(base)!r}: {why}; run it as it "
            "began, or start another (another output_dir, or overwrite_output_dir=true)"
        )
    return str(earlier["id"])


def first_differences(was: Any, now: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON values, in order."""
    if not isinstance(was, dict) or not isinstance(now, dict):
        return [prefix.rstrip(".") or "config"] if was != now else []
    found: list[str] = []
    for key in sorted({*was, *now}):
        if was.get(key) != now.get(key):
            found += first_differences(was.get(key), now.get(key), f"{prefix}{key}.")
    return found


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
    resume: bool = False  # continue the cross-validation in output_dir (finished folds kept)
    recorded: Any = None  # the command's config sections, which a resume must find the same

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

    def train(
        self, folds: list[tuple[np.ndarray, np.ndarray]], base: Path, plan_id: str
    ) -> list[FoldResult]:
        """One fresh model per fold, each from the same initial weights (the config's seed,
        whatever the caller's random state), trained into `base/fold-<k>`, which carries
        `plan_id`: a resume continues only the folds of its own cross-validation (an
        earlier one's, left by a stopped overwrite, train again)."""
        config = self.config
        results: list[FoldResult] = []
        for k, (train_idx, val_idx) in enumerate(folds, start=1):
            folder = base / f"fold-{k}"
            ours = self.resume and _stamp(folder) == plan_id
            if ours and fold_finished(folder):
                logger.info("fold %d/%d finished earlier: kept as it is", k, len(folds))
            else:
                logger.info("Training fold %d/%d", k, len(folds))
            overwrite = config.overwrite_output_dir or (self.resume and not ours)
            fold_config = config.replace(output_dir=str(folder), overwrite_output_dir=overwrite)
            atomic_write_text(folder / FOLD_STAMP, plan_id)
            seed_everything(config.seed)  # every fold starts from the same weights
            model = self.model_factory()
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_factory returned {type(model).__name__}, not an nn.Module")
            train_loader, val_loader = _fold_loaders(
                self.dataset, (train_idx, val_idx), config, config.seed + k, self.num_workers
            )
            with _quiet_about_finished_folds(), _said_as_the_cross_validations(k, base):
                result = TrainingManager(fold_config).train(
                    model,
                    train_loader,
                    val_loader,
                    task_type=self.task_type,
                    loss_function=self.loss_function,
                    evaluator=self.evaluator.fresh(),  # fresh state per fold
                    mode=self.mode,
                    resume_from="auto" if ours else None,  # finished: its result
                )
            results.append(_fold_result(k, result, len(val_idx)))
        return results


@contextlib.contextmanager
def _said_as_the_cross_validations(fold: int, base: Path) -> Iterator[None]:
    """A fold stopped by a signal stops the cross-validation, whose resume it names (the
    fold's own advice was a resume of that fold alone)."""
    try:
        yield
    except TrainingInterrupted as stopped:
        what = f"cross-validation in {str(base)!r} stopped in fold {fold} ({stopped.what})"
        raise TrainingInterrupted(
            f"{what}; continue it with Evaluator.cross_validate(..., resume=True) and the "
            "same arguments (CLI: the same command with --resume auto)",
            stopped.checkpoint,
            stopped.signal_name,
            what,
        ) from None


FOLD_STAMP = ".cv_plan_id"  # in each fold: the id of the cross-validation that began it


def _stamp(folder: Path) -> str | None:
    try:
        return (folder / FOLD_STAMP).read_text().strip()
    except OSError:
        return None


def fold_finished(folder: Path) -> bool:
    """Whether the fold run in `folder` ended (its summary.json says so)."""
    summary = read_json_or_none(folder / "summary.json")
    return isinstance(summary, dict) and summary.get("status") in ("finished", "stopped early")


@contextlib.contextmanager
def _quiet_about_finished_folds() -> Iterator[None]:
    """A resumed fold that had finished is said once by the cross-validation ("kept"),
    not again as a run with "nothing to resume (raise num_epochs ...)"."""

    def keep(record: logging.LogRecord) -> bool:
        return record.msg is not execution.FINISHED_NOTICE

    notices = execution.logger
    notices.addFilter(keep)
    try:
        yield
    finally:
        notices.removeFilter(keep)


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
