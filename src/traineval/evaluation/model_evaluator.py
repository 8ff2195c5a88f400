"""The metric engine: detects the task, streams metrics batch by batch, returns plain floats.

`ModelEvaluator` is everything the specification's `Evaluator` does except
cross-validation, which trains models (`traineval.assembly.evaluator` adds it): the
training loop validates with this class, so evaluation never depends on training.

`evaluate` is the one evaluation call: it returns an `EvaluationReport` (metrics, per-class
rows, confusion matrix, bootstrap intervals, files written), writes files only into the
folder it is given, and keeps nothing of the evaluation on the evaluator. `evaluate_model`
(the specification's) returns the report's metrics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.training_config import (
    BUILT_IN_METRICS,
    EvaluationConfig,
    EvaluationMode,
    TaskType,
    TrainingMode,
)
from ..runs.tracking import MetricsTracker
from ..tasks import detect_labeled_task
from ..training.batches import OutputTransform, check_loaders, in_eval_mode, move_to_device
from ..training.precision import available_device
from .accumulator import SCATTER_POINTS, Accumulator
from .predictions import PredictionWriter, class_labels
from .ranks import RankBatches, merge_ranks, this_ranks_own
from .report import EvaluationOptions, EvaluationReport, task_of
from .scoring import BatchScorer, Scored
from .user_metrics import UserMetric, named, resolve, user_metrics

__all__ = [
    "SCATTER_POINTS",
    "SPLIT_PREFIX",
    "EvaluationOptions",
    "EvaluationReport",
    "ModelEvaluator",
]

SPLIT_PREFIX = {
    EvaluationMode.TRAINING: "train",
    EvaluationMode.VALIDATION: "val",
    EvaluationMode.TESTING: "test",
    EvaluationMode.CROSS_VALIDATION: "cv",
    EvaluationMode.ENSEMBLE: "ensemble",
}
TASK_METRICS = {  # each task's metric list in EvaluationConfig
    TaskType.CLASSIFICATION: "classification_metrics",
    TaskType.REGRESSION: "regression_metrics",
    TaskType.MULTILABEL: "multilabel_metrics",
    TaskType.GENERATION: "generation_metrics",
}

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]  # what compute_metrics and score take

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pass:
    """One evaluation's settings as the streaming pass reads them."""

    device: torch.device
    options: EvaluationOptions  # the task, the split, the loss, ...
    folder: Path | None  # where predictions and plots go (None: nowhere)
    prefix: str  # the split's: val, test, ...
    text: Any = None  # decoded texts' BLEU / ROUGE state (with options.decode)


class ModelEvaluator:
    """Scores models: metrics by task, predictions, plots, ensembles (see `Evaluator`).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[2.0, 0.1], [0.2, 1.5], [1.0, 0.0]])
        >>> ModelEvaluator().compute_metrics(scores, torch.tensor([0, 1, 1]))["accuracy"]
        0.6666666666666666
    """

    def __init__(
        self,
        config: EvaluationConfig | None = None,
        *,
        output_transform: OutputTransform | None = None,
        metrics: Iterable[Any] | Mapping[str, Any] = (),
    ) -> None:
        """`metrics`: your own metrics for every task this evaluator scores, beside the
        config's (a list, or {name: metric}; see `traineval.evaluation.user_metrics`); the
        config's metric lists may name yours by import path or registered name.
        `output_transform` reads a model output the default rule cannot."""
        self.config = config or EvaluationConfig()
        self.given_metrics = named(metrics)
        self.user_metrics = _user_metrics(self.config, self.given_metrics)
        self.output_transform = output_transform
        self.metrics_tracker = MetricsTracker()
        # the classes' names and the predictions' ids when an evaluation's options give none
        self.class_names: Sequence[str] | None = None
        self.row_ids: Sequence[str] | None = None
        self._evaluations = 0
        self._last: EvaluationReport | None = None  # read only by the deprecated last_*

    def fresh(self) -> ModelEvaluator:
        """A copy of this evaluator (its class, config, output transform and metrics) with no
        evaluations tracked: cross-validation's folds each get one."""
        clone = copy.copy(self)
        clone.metrics_tracker = MetricsTracker()
        clone._evaluations, clone._last = 0, None
        return clone

    def metric_names(self, task_type: TaskType) -> list[str]:
        """The scalar metrics `evaluate_model` returns for a task (besides `loss`): the
        built-in ones the config lists, then the user's."""
        listed = getattr(self.config, TASK_METRICS[task_type])
        built_in = BUILT_IN_METRICS[TASK_METRICS[task_type]]
        names = [m for m in listed if m in built_in and m != "confusion_matrix"]
        return names + [m.name for m in self.user_metrics[task_type]]

    def minimizes(self, name: str) -> bool | None:
        """Whether a lower value of your metric `name` is better (its `higher_is_better`,
        else guessed from the name); None for a name that is not one of yours."""
        for found in self.user_metrics.values():
            for user in found:
                if user.name == name:
                    if user.guessed:
                        logger.warning(
                            "val_%s is taken as better when lower: neither its name nor the "
                            "metric says (declare it: traineval.evaluation.metric("
                            "higher_is_better=...), or set training.monitor_mode)",
                            name,
                        )
                    return user.minimize
        return None

    def compute_metrics(
        self,
        predictions: ArrayLike,
        targets: ArrayLike,
        task_type: TaskType | str | None = None,
    ) -> dict[str, float]:
        """Compute the task's metrics on one set of predictions and targets.

        The task is detected from the predictions' shape unless `task_type` is given (see
        `traineval.tasks.detect_task`); `score` returns the whole report.
        """
        return dict(self.score(predictions, targets, task_type).metrics)

    def score(
        self,
        predictions: ArrayLike,
        targets: ArrayLike,
        task_type: TaskType | str | None = None,
    ) -> EvaluationReport:
        """`compute_metrics`' report: metrics, per-class rows, confusion matrix, intervals.
        Predictions and targets may be tensors, NumPy arrays or lists; the task a
        `TaskType` or its value."""
        predictions, targets = as_tensor("predictions", predictions), as_tensor("targets", targets)
        given = task_of(task_type)
        task = given or detect_labeled_task(predictions, targets, self.config.ignore_index)
        if task is TaskType.CLASSIFICATION and targets.is_floating_point():
            whole_labels(targets)  # evaluate's loss refuses them; the counts would truncate
        accumulator = Accumulator(task, self.config, keep_curve=False)
        accumulator.start_user_metrics(self.user_metrics[task])
        accumulator.update(predictions, targets)
        return self._keep(self._finish(accumulator, self.class_names))

    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        options: EvaluationOptions | None = None,
        *,
        device: torch.device | str | None = None,
        task_type: TaskType | None = None,
        output_dir: str | Path | None = None,
    ) -> EvaluationReport:
        """Evaluate `model` on `loader`: the mean loss and the task's metrics, as a report.

        Streams: metric state stays on `device` (default: the model's) and is bounded by the
        number of classes (only `roc_auc` and function metrics keep every sample). The loss
        is averaged over items the way training averages it (samples, or non-ignored
        tokens); without a loss function, a model whose forward takes `labels` (Hugging
        Face models) is scored with its own loss on batches that carry `labels`, and a causal
        language model's metrics compare the logits at t with the label at t + 1. With
        `save_predictions` / `plot_metrics`, `predictions_<split>.csv` and the plots go to
        `<output_dir>/evaluation/` (`output_dir`, else the config's). `options` says the rest
        (`EvaluationOptions`: the split, the loss function, precision, distributed merging,
        decoding, class names, ...); `task_type` is `options.task_type` given alone.
        """
        check_loaders(loader=loader)
        how = _with_task(options or EvaluationOptions(), task_type)
        device = available_device(device) if device is not None else _device_of(model)
        sharded = how.distributed is not None and how.distributed.enabled
        folder = self._output_folder(output_dir) if how.write_files and not sharded else None
        plan = _Pass(device, how, folder, SPLIT_PREFIX[how.split], _text_state(how))
        scorer = BatchScorer(
            model,
            how.loss_function,
            unsupervised=how.training_mode is TrainingMode.UNSUPERVISED,
            ignore_index=self.config.ignore_index,
            transform=how.output_transform or self.output_transform,
        )
        failure: Exception | None = None
        with in_eval_mode(model):
            try:
                accumulator, writer = self._stream(scorer, loader, plan)
            except Exception as error:  # one rank's: said to every rank as they merge
                if not sharded or not this_ranks_own(error):
                    raise
                failure, accumulator, writer = error, None, None
        totals: tuple[float, ...] = scorer.loss_totals()
        if how.distributed is not None and sharded:
            merged = merge_ranks(how.distributed, accumulator, plan.text, failure)
            accumulator, plan.text = merged
            totals = tuple(how.distributed.sum(list(totals)))
            if accumulator is not None:  # the states travelled; the user's metrics did not
                accumulator.adopt_user_metrics(self.user_metrics[accumulator.task])
        if accumulator is None:
            raise ValueError("the evaluation loader yielded no batches")
        return self._keep(self._report(accumulator, totals, writer, plan))

    def evaluate_model(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        device: torch.device | str | None = None,
        loss_function: Any = None,
        *,
        output_dir: str | Path | None = None,
        **options: Any,
    ) -> dict[str, float]:
        """Evaluate `model` on `loader`; return the metrics (the specification's call).

        See `evaluate`, which returns the whole `EvaluationReport`; `options` are
        `EvaluationOptions` fields by keyword (`task_type=...`, `split=...`,
        `precision=...`, `distributed=...`, `write_files=False`, ...); an unknown name is
        a TypeError naming the known ones.
        """
        how = EvaluationOptions.of({**options, "loss_function": loss_function})
        report = self.evaluate(model, loader, how, device=device, output_dir=output_dir)
        return dict(report.metrics)

    def _stream(
        self, scorer: BatchScorer, loader: Iterable[Any], plan: _Pass
    ) -> tuple[Accumulator | None, PredictionWriter | None]:
        """Score every batch into the metric state (the task detected on the first) and
        the predictions file; returns both (None, None without batches)."""
        how = plan.options
        accumulator: Accumulator | None = None
        writer: PredictionWriter | None = None
        steps = RankBatches(loader, how.distributed if how.lockstep else None)
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for batch, real in steps:
                with steps.guard():  # in lockstep, the ranks agree on a failure first
                    if plan.device.type != "cpu":
                        batch = move_to_device(batch, plan.device)
                    with nullcontext() if how.precision is None else how.precision.autocast():
                        result = scorer.forward(batch)
                    if not real:
                        continue  # a repeated batch, only to keep the ranks in step
                    if accumulator is None:  # the first batch: the task, the files
                        accumulator = self._accumulator(scorer, result, plan)
                        writer = self._writer(accumulator.task, plan, stack)
                    scored = scorer.score(result, accumulator.task)  # adds to its loss sums
                    self._update(accumulator, writer, plan, scored)
            steps.raise_failure()
            if writer is not None:
                writer.check_ids()  # inside the with: a refused file is not written
        return accumulator, writer

    def _accumulator(self, scorer: BatchScorer, result: Any, plan: _Pass) -> Accumulator:
        """The metric state of a pass, for the task detected on its first batch's `result`."""
        how = plan.options
        task = how.task_type or detect_labeled_task(
            *scorer.pair(result), self.config.ignore_index, supervised=not scorer.unsupervised
        )
        config = self.config  # training's validations resample nothing
        if not how.intervals:
            config = dataclasses.replace(config, bootstrap_samples=0)
        accumulator = Accumulator(task, config, keep_curve=plan.folder is not None)
        accumulator.start_user_metrics(self.user_metrics[task])
        return accumulator

    def _report(
        self,
        accumulator: Accumulator,
        totals: tuple[float, ...],
        writer: PredictionWriter | None,
        plan: _Pass,
    ) -> EvaluationReport:
        """The evaluation's report (mean loss, the task's metrics, text metrics), tracked;
        its files."""
        total_loss, total_weight = totals
        metrics = {"loss": total_loss / total_weight if total_weight else float("nan")}
        report = EvaluationReport(metrics, accumulator.task)
        if self.config.compute_metrics:
            report = self._finish(accumulator, plan.options.class_names or self.class_names)
            report.metrics = {**metrics, **report.metrics}
        if plan.text is not None and plan.text.pairs:
            report.metrics.update(plan.text.compute())
        self._evaluations += 1
        self.metrics_tracker.update(
            {f"{plan.prefix}_{name}": value for name, value in report.metrics.items()},
            self._evaluations,
        )
        report.files = {"predictions": str(writer.path)} if writer is not None else {}
        if plan.folder is not None and self.config.plot_metrics:
            names = plan.options.class_names or self.class_names
            report.files.update(self._plot(accumulator, plan.folder, plan.prefix, names))
        return report

    def _writer(
        self, task: TaskType, plan: _Pass, stack: contextlib.ExitStack
    ) -> PredictionWriter | None:
        """The predictions file of this evaluation, when files are written and asked for."""
        if plan.folder is None or not self.config.save_predictions:
            return None
        path = plan.folder / f"predictions_{plan.prefix}.csv"
        threshold = self.config.multilabel_threshold
        names = plan.options.class_names or self.class_names
        ids = plan.options.row_ids or self.row_ids
        writer = PredictionWriter(
            path,
            task,
            threshold,
            list(names) if names is not None else None,
            ids=list(ids) if ids is not None else None,
            ignore_index=self.config.ignore_index,
        )
        return stack.enter_context(writer)

    def _update(
        self,
        accumulator: Accumulator,
        writer: PredictionWriter | None,
        plan: _Pass,
        scored: Scored,
    ) -> None:
        """Add one scored batch to the metrics, the predictions file and the decoded texts."""
        main, targets = scored.prediction, scored.targets
        if self.config.compute_metrics:
            accumulator.update(main, targets)
        if writer is not None:
            writer.write(main, targets)
        decode = plan.options.decode
        if plan.text is not None and decode is not None and main.ndim == 3:
            _add_texts(plan.text, decode, main, targets, self.config.ignore_index)

    def compute_text_metrics(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> dict[str, float]:
        """BLEU (corpus, 4-gram) and ROUGE-L (mean F-measure) of decoded texts.

        `references` holds one reference text per prediction, or a list of them. Tokenize
        the texts first: BLEU splits on whitespace. See `traineval.evaluation.text`.
        """
        from .text import TextStats

        stats = TextStats()
        stats.update(predictions, references)
        return stats.compute()

    def evaluate_ensemble(
        self,
        models_or_checkpoint_paths: Sequence[nn.Module | str | Path],
        loader: Iterable[Any],
        device: torch.device | str | None = None,
        *,
        model_factory: Callable[[], nn.Module] | None = None,
        output_dir: str | Path | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Evaluate several models together and each on its own.

        The ensemble averages probabilities (classification, generation) or predictions
        (regression). Checkpoint paths are loaded into `model_factory()` (weights only).
        Returns `{"ensemble": metrics, "members": [metrics, ...]}`; predictions and plots,
        when configured, are written for the ensemble (split "ensemble"). `options`:
        `EvaluationOptions` fields by keyword (`task_type`, `loss_function`,
        `output_transform`, `row_ids`, ...) but `split`, which is the ensemble's.
        """
        from .ensemble import EnsembleModule, check_members, load_members

        if "split" in options:
            raise TypeError(
                "evaluate_ensemble takes no split: its files are the 'ensemble' split's"
            )
        if len(models_or_checkpoint_paths) == 0:
            raise ValueError(
                "models_or_checkpoint_paths is empty: an ensemble needs at least one model "
                "or checkpoint path"
            )
        how = EvaluationOptions.of(options)
        where = available_device(device) if device is not None else torch.device("cpu")
        members = load_members(models_or_checkpoint_paths, model_factory, where)
        transform = how.output_transform or self.output_transform
        if not how.lockstep:  # (a sharded model's forward is a collective: no probe)
            check_members(members, loader, where, transform)  # before evaluating them all
        alone = dataclasses.replace(how, write_files=False, split=EvaluationMode.TESTING)
        reports = [self.evaluate(member, loader, alone, device=where) for member in members]
        # the members' task; it returns one prediction tensor, read by the default rule
        ensemble = EnsembleModule(members, how.task_type or reports[0].task, transform)
        # the loss function applies: the ensemble gives log-probabilities / a logit / means
        together = dataclasses.replace(how, output_transform=None, split=EvaluationMode.ENSEMBLE)
        report = self.evaluate(ensemble, loader, together, device=where, output_dir=output_dir)
        return {"ensemble": report.metrics, "members": [r.metrics for r in reports]}

    def _output_folder(self, output_dir: str | Path | None) -> Path | None:
        wanted = self.config.save_predictions or self.config.plot_metrics
        base = output_dir or self.config.output_dir
        if not wanted:
            return None
        if base is None:
            raise ValueError(
                "save_predictions / plot_metrics need somewhere to write: pass output_dir "
                "(e.g. a training result's output_dir) or set EvaluationConfig.output_dir"
            )
        folder = Path(base) / "evaluation"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _finish(
        self, accumulator: Accumulator, class_names: Sequence[str] | None
    ) -> EvaluationReport:
        """The report of the accumulated state: the wanted metrics, per-class rows, the
        confusion matrix (when listed), bootstrap intervals."""
        computed = accumulator.compute(self.config.average)
        computed.update(accumulator.user_values())
        report = EvaluationReport({}, accumulator.task)
        if accumulator.confusion is not None and "confusion_matrix" in (
            self.config.classification_metrics
        ):
            report.confusion = accumulator.confusion.matrix().numpy()
        counts = accumulator.confusion or accumulator.multilabel
        if counts is not None:
            rows = counts.per_class()
            labels = class_labels(list(class_names) if class_names else None, len(rows))
            report.per_class = [
                {"label": label, **row} for label, row in zip(labels, rows, strict=True)
            ]
        wanted = self.metric_names(accumulator.task)
        if accumulator.task is TaskType.GENERATION:
            wanted = ["loss", *wanted]
        intervals = accumulator.intervals(self.config.average)
        report.intervals = {name: intervals[name] for name in wanted if name in intervals}
        report.metrics = {name: computed[name] for name in wanted if name in computed}
        return report

    def _keep(self, report: EvaluationReport) -> EvaluationReport:
        self._last = report  # for the deprecated last_* attributes only
        return report

    def _deprecated(self, name: str, instead: str) -> EvaluationReport | None:
        warnings.warn(
            f"ModelEvaluator.{name} is deprecated and goes in traineval 0.3: evaluate(...) "
            f"(or score(...)) returns an EvaluationReport; read its {instead}",
            FutureWarning,
            stacklevel=3,
        )
        return self._last

    @property
    def last_intervals(self) -> dict[str, tuple[float, float]]:
        last = self._deprecated("last_intervals", ".intervals")
        return last.intervals if last is not None else {}

    @property
    def last_per_class(self) -> list[dict[str, Any]] | None:
        last = self._deprecated("last_per_class", ".per_class")
        return last.per_class if last is not None else None

    @property
    def last_confusion_matrix(self) -> Any:
        last = self._deprecated("last_confusion_matrix", ".confusion")
        return last.confusion if last is not None else None

    @property
    def last_files(self) -> dict[str, str]:
        last = self._deprecated("last_files", ".files")
        return last.files if last is not None else {}

    @property
    def last_task_type(self) -> TaskType | None:
        last = self._deprecated("last_task_type", ".task")
        return last.task if last is not None else None

    def _plot(
        self,
        accumulator: Accumulator,
        folder: Path,
        prefix: str,
        class_names: Sequence[str] | None = None,
    ) -> dict[str, str]:
        from ..reporting import plots

        if plots.unavailable():  # the metrics stand without their figures
            return {}
        files: dict[str, str] = {}
        if accumulator.confusion is not None:
            path = folder / f"confusion_matrix_{prefix}.png"
            matrix = accumulator.confusion.matrix().numpy()  # its axes named as per_class is
            plots.confusion_matrix(matrix, path, class_labels(class_names, len(matrix)))
            files["confusion_matrix"] = str(path)
            scores = accumulator.scores
            if scores is not None and scores.keep_scores and scores.num_classes == 2:
                path = folder / f"roc_curve_{prefix}.png"
                plots.roc_curve(*scores.curve(), path)
                files["roc_curve"] = str(path)
            if scores is not None and scores.calibration_bins:
                path = folder / f"reliability_{prefix}.png"
                plots.reliability_diagram(scores.reliability(), path)
                files["reliability_diagram"] = str(path)
        if accumulator.scatter is not None:
            path = folder / f"predicted_vs_actual_{prefix}.png"
            plots.predicted_vs_actual(*accumulator.scatter_arrays(), path)
            files["predicted_vs_actual"] = str(path)
        return files


def _add_texts(
    text: Any,
    decode: Callable[[list[int]], str],
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
) -> None:
    predicted = logits.argmax(-1).cpu()
    gold = targets.cpu()
    kept = gold != ignore_index
    hypotheses = [decode(p[k].tolist()) for p, k in zip(predicted, kept, strict=True)]
    references = [decode(g[k].tolist()) for g, k in zip(gold, kept, strict=True)]
    text.update(hypotheses, references)


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """`value` as a tensor (a NumPy array, a list of numbers, a pandas column); anything
    else is refused, naming the argument."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} of type {type(value).__name__} cannot be read as numbers: pass a tensor, "
            "a NumPy array or a list of numbers"
        ) from None


def whole_labels(targets: torch.Tensor) -> None:
    """Refuse float class labels that are not whole numbers (0.4, 1.9), naming the first;
    scikit-learn refuses such continuous targets too. (Reads the targets: one sync.)"""
    if targets.ndim > 1 and targets.shape[-1] != 1:
        return  # class probabilities, not labels
    flat = targets.reshape(-1)
    bad = ~((flat == flat.round()) & flat.isfinite())
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets holds {int(bad.sum())} values that are not class labels, the first "
            f"{flat[position].item():g} at position {position}: classification takes whole "
            "numbers (integer labels)"
        )


def _with_task(how: EvaluationOptions, task_type: TaskType | None) -> EvaluationOptions:
    """`how` with the task given beside it (`evaluate(..., task_type=...)`); a task that
    differs from the options' is refused."""
    if task_type is None:
        return how
    given = dataclasses.replace(how, task_type=task_type)  # checked: a TaskType or its value
    if how.task_type is not None and how.task_type is not given.task_type:
        raise ValueError(
            f"task_type={task_type!r} differs from options.task_type={how.task_type!r}: "
            "give the task once"
        )
    return given


def _text_state(how: EvaluationOptions) -> Any:
    """BLEU / ROUGE-L state when the options decode token ids, else None."""
    if how.decode is None:
        return None
    from .text import TextStats

    return TextStats()


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _user_metrics(
    config: EvaluationConfig, python: list[tuple[str, Any]]
) -> dict[TaskType, list[UserMetric]]:
    """Each task's user metrics: the config list's import paths and registered names
    (resolved now, so a bad one is refused before any work), then `python` (every task's)."""
    found: dict[TaskType, list[UserMetric]] = {}
    for task, field in TASK_METRICS.items():
        built_in = BUILT_IN_METRICS[field]
        listed = [
            resolve(entry, f"evaluation.{field}")
            for entry in getattr(config, field)
            if entry not in built_in
        ]
        found[task] = user_metrics([*listed, *python], built_in)
    return found
