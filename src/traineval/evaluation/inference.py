"""Predictions from Python: a model's outputs, probabilities and classes over a loader
(`traineval.predict`; `TrainingManager.predict` uses the run's device and precision).

The model's output is read by the rule training uses (`traineval.training.batches`: a tensor,
the first element of a tuple, `logits` of a mapping or a Hugging Face output, or your
`PredictOptions.output_transform`). Batches are `(inputs, targets)` or inputs alone; each
batch's results move to the CPU as it is done, so the device holds one batch at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.checks import fail, number
from ..config.training_config import TaskType
from ..tasks import detect_labeled_task
from ..training.batches import (
    OutputTransform,
    forward,
    in_eval_mode,
    move_to_device,
    prediction_of,
    split_batch,
)
from ..training.precision import Precision, available_device, resolve_precision
from .metrics import are_probabilities, class_probabilities


@dataclasses.dataclass
class Predictions:
    """A model's predictions over a loader, in its order, on the CPU.

    `outputs`: the prediction tensor as the model gave it (logits, values; float64 stays
    float64, the rest in float32: bf16 or fp16 autocast outputs are widened); `probabilities`:
    classification's class probabilities (softmax; [1 - p, p] for one binary logit) or
    multi-label's per-label sigmoid; `classes`: the predicted class (classification) or the
    0/1 label matrix (multi-label, at `threshold`); `targets`: when the batches carry them.
    """

    task: TaskType
    outputs: torch.Tensor
    probabilities: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def numpy(self) -> dict[str, np.ndarray]:
        """The tensors as NumPy arrays, by field name (those present)."""
        fields = ("outputs", "probabilities", "classes", "targets")
        return {f: getattr(self, f).numpy() for f in fields if getattr(self, f) is not None}


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How `predict` reads the model's outputs: `output_transform` picks the prediction
    tensor out of an output the default rule cannot read; `threshold` (in (0, 1)) turns
    multi-label probabilities into 0/1 labels, and a binary classifier's probability of
    class 1 into its class (class 1 above it). A bad value is refused on construction."""

    output_transform: OutputTransform | None = None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        """Refuse a bad value, naming the field, the value and what is allowed."""
        if self.output_transform is not None and not callable(self.output_transform):
            fail("output_transform", self.output_transform, "expected a callable or None")
        number("threshold", self.threshold, minimum=0.0, strict=True, below=1.0)


def predict(
    model: nn.Module,
    loader: Iterable[Any],
    options: PredictOptions | None = None,
    *,
    device: torch.device | str | None = None,
    precision: Precision | str = "fp32",
    task_type: TaskType | None = None,
) -> Predictions:
    """Run `model` over `loader` and return its `Predictions` (see the module docstring).

    `device` defaults to the model's; `precision` is a name ("fp32", "bf16", "fp16",
    "auto") or a `Precision`. The task is `task_type`, else told from the first batch's
    outputs (and targets, when there are: 0/1 targets of the outputs' shape are
    multi-label; one output a sample beside integer labels 0/1 is a binary logit).
    `options` (`PredictOptions`) holds the output transform and the multi-label threshold.
    The model's train/eval mode is restored afterwards.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> found = predict(model, [torch.ones(4, 3)])
        >>> found.classes.shape, found.probabilities.sum(1).allclose(torch.ones(4))
        (torch.Size([4]), True)
    """
    how = options or PredictOptions()
    where = available_device(device) if device is not None else _device_of(model)
    autocast = (
        precision if isinstance(precision, Precision) else resolve_precision(precision, where)
    )
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with in_eval_mode(model), torch.inference_mode():
        for batch in loader:
            inputs, target = split_batch(_moved(batch, where))
            with autocast.autocast():
                output = prediction_of(forward(model, inputs), how.output_transform)
            if not outputs:  # a final softmax? read in the outputs' own dtype, once
                given = are_probabilities(output)
            outputs.append(_widened(output.detach()).cpu())
            if isinstance(target, torch.Tensor):
                targets.append(target.detach().cpu())
    if not outputs:
        raise ValueError("predict: the loader yielded no batches")
    return _predictions(outputs, targets, task_type, (how.threshold, given))


def _predictions(
    outputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    task_type: TaskType | None,
    reading: tuple[float, bool],
) -> Predictions:
    """The gathered batches as `Predictions` of the task; `reading`: the threshold, and
    whether the outputs are probabilities already (`are_probabilities`)."""
    threshold, given = reading
    joined = torch.cat(outputs)
    truth = torch.cat(targets) if targets and len(targets) == len(outputs) else None
    task = task_type or detect_labeled_task(joined, truth)
    found = Predictions(task, joined, targets=truth)
    if task is TaskType.CLASSIFICATION:
        found.probabilities = joined if given else class_probabilities(joined, detect=False)
        found.classes = found.probabilities.argmax(dim=1)
        if found.probabilities.shape[1] == 2:  # binary: class 1 above the threshold
            found.classes = (found.probabilities[:, 1] > threshold).long()
    elif task is TaskType.MULTILABEL:
        found.probabilities = torch.sigmoid(joined)
        found.classes = (found.probabilities > threshold).long()
    return found


def _widened(output: torch.Tensor) -> torch.Tensor:
    return output if output.dtype == torch.float64 else output.float()


def _moved(batch: Any, device: torch.device) -> Any:
    return move_to_device(batch, device) if device.type != "cpu" else batch


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
