"""The Evaluator: detects the task, streams metrics batch by batch, returns plain floats."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import EvaluationConfig, TaskType, TrainingMode
from ..modes.base import (
    batch_size_of,
    count_required_args,
    forward,
    loss_weight,
    move_to_device,
    split_batch,
)
from ..precision import Precision
from ..tasks import default_loss, detect_task
from ..tracking import MetricsTracker
from .metrics import ConfusionMatrix, RegressionStats, TokenStats


class Evaluator:
    """Comprehensive model evaluator (SPEC.md's `Evaluator`).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[2.0, 0.1], [0.2, 1.5], [1.0, 0.0]])
        >>> Evaluator().compute_metrics(scores, torch.tensor([0, 1, 1]))["accuracy"]
        0.6666666666666666
    """

    def __init__(self, config: EvaluationConfig | None = None) -> None:
        self.config = config or EvaluationConfig()
        self.metrics_tracker = MetricsTracker()
        self.last_confusion_matrix: np.ndarray | None = None
        self.last_task_type: TaskType | None = None

    def metric_names(self, task_type: TaskType) -> list[str]:
        """The scalar metrics `evaluate_model` returns for a task (besides `loss`)."""
        if task_type is TaskType.CLASSIFICATION:
            return [m for m in self.config.classification_metrics if m != "confusion_matrix"]
        if task_type is TaskType.REGRESSION:
            return list(self.config.regression_metrics)
        return list(self.config.generation_metrics)

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
        accumulator = _Accumulator(task, self.config.ignore_index)
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
        mode: TrainingMode = TrainingMode.SUPERVISED,
        precision: Precision | None = None,
    ) -> dict[str, float]:
        """Evaluate `model` on `loader`: the mean loss and the task's metrics.

        Streams: metric state stays on `device` and is bounded by the number of classes. The
        loss is averaged over items the way training averages it (samples, or non-ignored
        tokens). In unsupervised mode the targets are the inputs.
        """
        device = torch.device(device) if device is not None else _device_of(model)
        was_training = model.training
        model.eval()
        accumulator: _Accumulator | None = None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        weight_sum = torch.zeros((), dtype=torch.float64, device=device)
        try:
            with torch.inference_mode():
                for batch in loader:
                    if device.type != "cpu":
                        batch = move_to_device(batch, device)
                    inputs, targets = split_batch(batch)
                    if mode is TrainingMode.UNSUPERVISED:
                        targets = inputs
                    elif targets is None:
                        raise ValueError("evaluation needs (inputs, targets) batches")
                    if precision is not None:
                        with precision.autocast():
                            outputs = forward(model, inputs)
                    else:
                        outputs = forward(model, inputs)
                    if accumulator is None:
                        task = task_type or detect_task(outputs, targets)
                        accumulator = _Accumulator(task, self.config.ignore_index)
                        if loss_function is None:
                            loss_function = default_loss(task, self.config.ignore_index)
                        takes_targets = count_required_args(loss_function) >= 2
                    args = (outputs, targets) if takes_targets else (outputs,)
                    loss = loss_function(*args)
                    weight = loss_weight(loss_function, targets, batch_size_of(inputs))
                    loss_sum += loss.detach().double() * weight
                    weight_sum += weight
                    if self.config.compute_metrics:
                        accumulator.update(_main_output(outputs), targets)
        finally:
            model.train(was_training)
        if accumulator is None:
            raise ValueError("the evaluation loader yielded no batches")
        total_weight = float(weight_sum)
        metrics = {"loss": float(loss_sum) / total_weight if total_weight else float("nan")}
        if self.config.compute_metrics:
            metrics.update(self._finish(accumulator))
        return metrics

    def _finish(self, accumulator: _Accumulator) -> dict[str, float]:
        self.last_task_type = accumulator.task
        computed = accumulator.compute(self.config.average)
        if accumulator.confusion is not None and "confusion_matrix" in (
            self.config.classification_metrics
        ):
            self.last_confusion_matrix = accumulator.confusion.matrix().numpy()
        wanted = self.metric_names(accumulator.task)
        if accumulator.task is TaskType.GENERATION:
            wanted = ["loss", *wanted]
        return {name: computed[name] for name in wanted if name in computed}


class _Accumulator:
    """The streaming metric state of one task."""

    def __init__(self, task: TaskType, ignore_index: int) -> None:
        self.task = task
        self.ignore_index = ignore_index
        self.confusion: ConfusionMatrix | None = None
        self.regression = RegressionStats() if task is TaskType.REGRESSION else None
        self.tokens = TokenStats(ignore_index) if task is TaskType.GENERATION else None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.task is TaskType.CLASSIFICATION:
            if self.confusion is None:
                classes = outputs.shape[1] if outputs.ndim == 2 and outputs.shape[1] > 1 else 2
                self.confusion = ConfusionMatrix(classes, self.ignore_index)
            self.confusion.update(outputs, targets)
        elif self.regression is not None:
            if targets.shape[0] != outputs.shape[0]:
                raise ValueError(
                    f"{outputs.shape[0]} predictions but {targets.shape[0]} targets in a batch"
                )
            self.regression.update(outputs, targets)
        elif self.tokens is not None:
            self.tokens.update(outputs, targets)

    def compute(self, average: str) -> dict[str, float]:
        if self.confusion is not None:
            return self.confusion.compute(average)
        if self.regression is not None:
            return self.regression.compute()
        assert self.tokens is not None
        return self.tokens.compute()


def _main_output(outputs: Any) -> torch.Tensor:
    """The prediction tensor of a model that returns a tuple (e.g. logits, extras)."""
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
