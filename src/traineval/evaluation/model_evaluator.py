"""The metric engine: detects the task, streams metrics batch by batch, returns plain floats.

`ModelEvaluator` is everything the specification's `Evaluator` does except
cross-validation, which trains models (`traineval.assembly.evaluator` adds it): the
training loop validates with this class, so evaluation never depends on training.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from ..system.distributed import Distributed
from ..tasks import align_regression, detect_task
from ..training.batches import OutputTransform, move_to_device
from ..training.precision import Precision
from .bootstrap import classification_intervals, regression_intervals
from .metrics import (
    ConfusionMatrix,
    MultilabelStats,
    ProbabilityStats,
    RegressionStats,
    TokenStats,
)
from .predictions import PredictionWriter, class_labels
from .scoring import BatchScorer, Scored
from .user_metrics import UserMetric, named, resolve, user_metrics

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
SCATTER_POINTS = 10_000  # predicted-vs-actual plots keep this many points, not all


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
        config's metric lists may name yours by import path or registered name."""
        self.config = config or EvaluationConfig()
        self.given_metrics = named(metrics)
        self.user_metrics = _user_metrics(self.config, self.given_metrics)
        # reads the prediction from a model's output the default rule cannot read
        self.output_transform = output_transform
        self.metrics_tracker = MetricsTracker()
        self.last_confusion_matrix: np.ndarray | None = None
        # classification / multi-label: each class's label (its name, else its index),
        # precision, recall, F1 and support
        self.last_per_class: list[dict[str, Any]] | None = None
        # names of the classes (labels), in order: per-class rows and predictions use them
        self.class_names: list[str] | None = None
        self.row_ids: list[str] | None = None  # the predictions file's ids (else positions)
        self.last_task_type: TaskType | None = None
        self.last_files: dict[str, str] = {}
        # with bootstrap_samples: each metric's (low, high) at confidence_level
        self.last_intervals: dict[str, tuple[float, float]] = {}
        self.run_dir: Path | None = None  # set by TrainingManager.train: where files go
        self._evaluations = 0

    def fresh(self) -> ModelEvaluator:
        """A new evaluator of this one's class, config, output transform and metrics, with
        no state (cross-validation's folds each get one)."""
        return type(self)(
            self.config, output_transform=self.output_transform, metrics=dict(self.given_metrics)
        )

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
                    return user.minimize
        return None

    def compute_metrics(
        self,
        predictions: torch.Tensor,
        targets: torch.Tensor,
        task_type: TaskType | None = None,
    ) -> dict[str, float]:
        """Compute the task's metrics on one set of predictions and targets.

        The task is detected from the predictions' shape unless `task_type` is given (see
        `traineval.tasks.detect_task`). The confusion matrix goes to `last_confusion_matrix`.
        """
        task = task_type or detect_task(predictions, targets)
        accumulator = _Accumulator(task, self.config, keep_curve=False)
        accumulator.start_user_metrics(self.user_metrics[task])
        accumulator.update(predictions, targets)
        return self._finish(accumulator)

    def evaluate_model(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        device: torch.device | str | None = None,
        loss_function: Any = None,
        *,
        task_type: TaskType | None = None,
        training_mode: TrainingMode = TrainingMode.SUPERVISED,
        precision: Precision | None = None,
        split: EvaluationMode = EvaluationMode.VALIDATION,
        output_dir: str | Path | None = None,
        write_files: bool = True,
        decode: Callable[[list[int]], str] | None = None,
        distributed: Distributed | None = None,
        lockstep: bool = False,
        output_transform: OutputTransform | None = None,
    ) -> dict[str, float]:
        """Evaluate `model` on `loader`: the mean loss and the task's metrics.

        Streams: metric state stays on `device` and is bounded by the number of classes (only
        `roc_auc` keeps every score). The loss is averaged over items the way training
        averages it (samples, or non-ignored tokens). In unsupervised mode the targets are the
        inputs. With `save_predictions` / `plot_metrics` on (and `write_files`),
        `predictions_<split>.csv` and the plots go to `<output_dir>/evaluation/`; `output_dir`
        defaults to the config's, then to the run directory of the last `train` it served.
        For generation, `decode` (token ids -> text) adds BLEU and ROUGE-L of the greedy
        (argmax) tokens against the targets, both without the ignored positions.

        With `distributed` (data-parallel training), each rank evaluates its own share of
        the data and the metric states are merged across ranks: every rank returns the
        metrics of all samples, each counted once, also when the shares are uneven or one
        is empty. Files are not written in that case (`write_files` is ignored).
        The model's output is read as in training (`traineval.training.batches`;
        `output_transform`, or the evaluator's own, reads anything else). Without a
        `loss_function`, a model whose
        forward takes `labels` (Hugging Face models) is scored with its own loss on batches
        that carry `labels`; a causal language model's metrics compare the logits at position
        t with the label at t + 1, as its loss does.
        `lockstep` (for a model whose forward is a collective, e.g. FSDP's) makes every rank
        run as many forward passes as the rank with the most batches, repeating its last
        batch and ignoring those outputs.
        """
        from .text import TextStats

        text = TextStats() if decode is not None else None
        device = torch.device(device) if device is not None else _device_of(model)
        prefix = SPLIT_PREFIX[split]
        sharded = distributed is not None and distributed.enabled
        folder = self._output_folder(output_dir) if write_files and not sharded else None
        was_training = model.training
        model.eval()
        scorer = BatchScorer(
            model,
            loss_function,
            unsupervised=training_mode is TrainingMode.UNSUPERVISED,
            ignore_index=self.config.ignore_index,
            transform=output_transform or self.output_transform,
        )
        batches = _batches(loader, distributed if lockstep else None)
        try:
            accumulator, writer = self._stream(
                scorer, batches, device, precision, task_type, folder, prefix, text, decode
            )
        finally:
            model.train(was_training)
        totals: tuple[float, ...] = scorer.loss_totals()
        if distributed is not None and sharded:
            accumulator, text = _merge_ranks(distributed, accumulator, text)
            totals = tuple(distributed.sum(list(totals)))
            if accumulator is not None:  # the states travelled; the user's metrics did not
                accumulator.adopt_user_metrics(self.user_metrics[accumulator.task])
        if accumulator is None:
            raise ValueError("the evaluation loader yielded no batches")
        return self._results(accumulator, text, totals, writer, folder, prefix)

    def _stream(
        self,
        scorer: BatchScorer,
        batches: Iterable[tuple[Any, bool]],
        device: torch.device,
        precision: Precision | None,
        task_type: TaskType | None,
        folder: Path | None,
        prefix: str,
        text: Any,
        decode: Callable[[list[int]], str] | None,
    ) -> tuple[_Accumulator | None, PredictionWriter | None]:
        """Score every batch into the metric state (the task detected on the first) and
        the predictions file; returns both (None, None without batches)."""
        accumulator: _Accumulator | None = None
        writer: PredictionWriter | None = None
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for batch, real in batches:
                if device.type != "cpu":
                    batch = move_to_device(batch, device)
                with precision.autocast() if precision is not None else nullcontext():
                    result = scorer.forward(batch)
                if not real:
                    continue  # a repeated batch, only to keep the ranks in step
                if accumulator is None:  # the first batch: the task, the files
                    task = task_type or detect_task(
                        *scorer.pair(result), multilabel=not scorer.unsupervised
                    )
                    accumulator = _Accumulator(task, self.config, keep_curve=folder is not None)
                    accumulator.start_user_metrics(self.user_metrics[task])
                    writer = self._writer(task, folder, prefix, stack)
                scored = scorer.score(result, accumulator.task)  # adds to its loss sums
                self._update(accumulator, writer, text, decode, scored)
        return accumulator, writer

    def _results(
        self,
        accumulator: _Accumulator,
        text: Any,
        totals: tuple[float, ...],
        writer: PredictionWriter | None,
        folder: Path | None,
        prefix: str,
    ) -> dict[str, float]:
        """The evaluation's metrics (mean loss, the task's, text), tracked; its files."""
        total_loss, total_weight = totals
        metrics = {"loss": total_loss / total_weight if total_weight else float("nan")}
        if self.config.compute_metrics:
            metrics.update(self._finish(accumulator))
        if text is not None and text.pairs:
            metrics.update(text.compute())
        self._evaluations += 1
        self.metrics_tracker.update(
            {f"{prefix}_{name}": value for name, value in metrics.items()}, self._evaluations
        )
        self.last_files = {"predictions": str(writer.path)} if writer is not None else {}
        if folder is not None and self.config.plot_metrics:
            self.last_files.update(self._plot(accumulator, folder, prefix))
        return metrics

    def _writer(
        self, task: TaskType, folder: Path | None, prefix: str, stack: contextlib.ExitStack
    ) -> PredictionWriter | None:
        """The predictions file of this evaluation, when files are written and asked for."""
        if folder is None or not self.config.save_predictions:
            return None
        path = folder / f"predictions_{prefix}.csv"
        threshold = self.config.multilabel_threshold
        writer = PredictionWriter(path, task, threshold, self.class_names, ids=self.row_ids)
        return stack.enter_context(writer)

    def _update(
        self,
        accumulator: _Accumulator,
        writer: PredictionWriter | None,
        text: Any,
        decode: Callable[[list[int]], str] | None,
        scored: Scored,
    ) -> None:
        """Add one scored batch to the metrics, the predictions file and the decoded texts."""
        main, targets = scored.prediction, scored.targets
        if self.config.compute_metrics:
            accumulator.update(main, targets)
        if writer is not None:
            writer.write(main, targets)
        if text is not None and decode is not None and main.ndim == 3:
            _add_texts(text, decode, main, targets, self.config.ignore_index)

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
        loss_function: Any = None,
        task_type: TaskType | None = None,
        split: EvaluationMode = EvaluationMode.TESTING,
        output_dir: str | Path | None = None,
        output_transform: OutputTransform | None = None,
    ) -> dict[str, Any]:
        """Evaluate several models together and each on its own.

        The ensemble averages probabilities (classification, generation) or predictions
        (regression). Checkpoint paths are loaded into `model_factory()` (weights only).
        Returns `{"ensemble": metrics, "members": [metrics, ...]}`; predictions and plots,
        when configured, are written for the ensemble.
        """
        from .ensemble import EnsembleModule, load_members

        where = torch.device(device) if device is not None else torch.device("cpu")
        members = load_members(models_or_checkpoint_paths, model_factory, where)
        member_metrics = [
            self.evaluate_model(
                member,
                loader,
                where,
                loss_function,
                task_type=task_type,
                split=split,
                write_files=False,
                output_transform=output_transform,
            )
            for member in members
        ]
        transform = output_transform or self.output_transform
        ensemble = self.evaluate_model(
            # the members' task; it returns one prediction tensor, read by the default rule
            EnsembleModule(members, task_type or self.last_task_type, transform),
            loader,
            where,
            loss_function,  # log-probabilities / a logit / means: the members' losses apply
            task_type=task_type,
            split=EvaluationMode.ENSEMBLE,
            output_dir=output_dir,
        )
        return {"ensemble": ensemble, "members": member_metrics}

    def _output_folder(self, output_dir: str | Path | None) -> Path | None:
        wanted = self.config.save_predictions or self.config.plot_metrics
        base = output_dir or self.config.output_dir or self.run_dir
        if not wanted:
            return None
        if base is None:
            raise ValueError(
                "save_predictions / plot_metrics need somewhere to write: set "
                "EvaluationConfig.output_dir or pass output_dir"
            )
        folder = Path(base) / "evaluation"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _finish(self, accumulator: _Accumulator) -> dict[str, float]:
        self.last_task_type = accumulator.task
        computed = accumulator.compute(self.config.average)
        if accumulator.confusion is not None and "confusion_matrix" in (
            self.config.classification_metrics
        ):
            self.last_confusion_matrix = accumulator.confusion.matrix().numpy()
        counts = accumulator.confusion or accumulator.multilabel
        self.last_per_class = None
        if counts is not None:
            rows = counts.per_class()
            labels = class_labels(self.class_names, len(rows))
            self.last_per_class = [
                {"label": label, **row} for label, row in zip(labels, rows, strict=True)
            ]
        wanted = self.metric_names(accumulator.task)
        if accumulator.task is TaskType.GENERATION:
            wanted = ["loss", *wanted]
        computed.update(accumulator.user_values())
        intervals = accumulator.intervals(self.config.average)
        self.last_intervals = {name: intervals[name] for name in wanted if name in intervals}
        return {name: computed[name] for name in wanted if name in computed}

    def _plot(self, accumulator: _Accumulator, folder: Path, prefix: str) -> dict[str, str]:
        from ..reporting import plots

        if plots.unavailable():  # the metrics stand without their figures
            return {}
        files: dict[str, str] = {}
        if accumulator.confusion is not None:
            path = folder / f"confusion_matrix_{prefix}.png"
            plots.confusion_matrix(accumulator.confusion.matrix().numpy(), path)
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


class _Accumulator:
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
        self.user = [metric.start() for metric in user]

    def adopt_user_metrics(self, local: Sequence[UserMetric]) -> None:
        for metric, mine in zip(self.user, local, strict=True):
            metric.adopt(mine)

    def _update_user(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The user's metrics see the task's predictions, without ignored targets."""
        if self.task is TaskType.CLASSIFICATION and targets.ndim == 1:
            kept = targets != self.config.ignore_index
            if not bool(kept.all()):
                outputs, targets = outputs[kept], targets[kept]
        for metric in self.user:
            metric.update(outputs, targets, self.task)

    def user_values(self) -> dict[str, float]:
        return {m.name: m.compute(self.config.ignore_index) for m in self.user}

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.user:
            self._update_user(outputs, targets)
        if self.task is TaskType.CLASSIFICATION:
            if self.confusion is None:
                self._start_classification(outputs)
            assert self.confusion is not None
            self.confusion.update(outputs, targets)
            if self.scores is not None:
                self.scores.update(outputs, targets)
            if self.samples is not None:
                binary = outputs.ndim == 1 or outputs.shape[1] == 1
                chosen = (outputs.reshape(-1) > 0).long() if binary else outputs.argmax(dim=1)
                self.samples.append((chosen.detach(), targets.reshape(-1).detach()))
        elif self.regression is not None:
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
        elif self.tokens is not None:
            self.tokens.update(outputs, targets)
        elif self.multilabel is not None:
            self.multilabel.update(outputs, targets)

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

    def merge(self, other: _Accumulator) -> None:
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
                out.update(self.scores.compute())
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
        samples, level, seed = c.bootstrap_samples, c.confidence_level, c.bootstrap_seed
        found: dict[str, tuple[float, float]] = {}
        for metric in self.user if samples else ():
            interval = metric.interval(c.ignore_index, samples=samples, level=level, seed=seed)
            if interval is not None:
                found[metric.name] = interval
        return {**self._built_in_intervals(average), **found}

    def _built_in_intervals(self, average: str) -> dict[str, tuple[float, float]]:
        if not self.samples:
            return {}
        c = self.config
        samples, level, seed = c.bootstrap_samples, c.confidence_level, c.bootstrap_seed
        predictions = torch.cat([p.cpu() for p, _ in self.samples]).numpy()
        targets = torch.cat([t.cpu() for _, t in self.samples]).numpy()
        if self.confusion is not None:
            kept = targets != c.ignore_index
            classes = self.confusion.num_classes
            return classification_intervals(
                targets[kept],
                predictions[kept],
                classes,
                average,
                samples=samples,
                level=level,
                seed=seed,
            )
        return regression_intervals(predictions, targets, samples=samples, level=level, seed=seed)

    def scatter_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.scatter
        predictions = torch.cat([p for p, _ in self.scatter]).numpy()
        targets = torch.cat([t for _, t in self.scatter]).numpy()
        return predictions, targets


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


def _batches(loader: Iterable[Any], job: Distributed | None) -> Iterable[tuple[Any, bool]]:
    """The loader's batches, each marked real; in lockstep across `job`'s ranks when given
    (a distributed model whose forward is a collective)."""
    if job is not None and job.enabled:
        return _lockstep(loader, job)
    return ((batch, True) for batch in loader)


def _lockstep(loader: Iterable[Any], job: Distributed) -> Iterator[tuple[Any, bool]]:
    """This rank's batches, then its last batch again (marked not real) until every rank
    has made as many forward passes as the one with the most batches."""
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "evaluating a sharded (FSDP) model needs a loader with len(), so the ranks can "
            "step together"
        ) from None
    counts = job.gather(count)
    if max(counts) and min(counts) == 0:
        raise ValueError(
            f"evaluating a sharded (FSDP) model needs a batch on every rank; the ranks have "
            f"{counts} batches (fewer samples than ranks?)"
        )
    last = None
    for batch in loader:
        last = batch
        yield batch, True
    for _ in range(max(counts) - count):
        yield last, False


def _merge_ranks(
    job: Distributed, accumulator: _Accumulator | None, text: Any
) -> tuple[_Accumulator | None, Any]:
    """Every rank's metric state, merged in rank order: the same result on every rank."""
    parts = job.gather((_on_cpu(accumulator), text))
    merged: _Accumulator | None = None
    merged_text = None
    for part, part_text in parts:
        if part is not None:
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        if part_text is not None:
            if merged_text is None:
                merged_text = part_text
            else:
                merged_text.merge(part_text)
    return merged, merged_text


def _on_cpu(value: Any) -> Any:
    """A copy of a metric state with its tensors on the CPU (to send to other ranks)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    if isinstance(value, UserMetric):
        return value.to_cpu()
    if hasattr(value, "merge"):  # _Accumulator and the metric states it holds
        clone = copy.copy(value)
        for key, item in vars(value).items():
            setattr(clone, key, _on_cpu(item))
        return clone
    return value


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
