"""What one evaluation is asked (`EvaluationOptions`) and what it returns (`EvaluationReport`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from ..config.checks import boolean, fail
from ..config.training_config import EvaluationConfig, EvaluationMode, TaskType, TrainingMode
from ..system.distributed import Distributed
from ..tasks import refuse_unreduced
from ..training.batches import OutputTransform
from ..training.precision import Precision

_Choice = TypeVar("_Choice", bound=Enum)


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """How an evaluation runs, besides the model, the data, the device and where files go.

    `training_mode`: unsupervised compares the outputs with the inputs. `precision`: the
    run's autocast. `decode` (token ids -> text) adds BLEU and ROUGE-L for generation.
    `distributed`: each rank evaluates its share and the states are merged (no files are
    written then). `lockstep`: every rank makes as many forward passes as the rank with
    the most batches (a model whose forward is a collective, e.g. FSDP's).
    `output_transform` reads a model output the default rule cannot. `class_names` (one
    per class, in order) name the classes in per-class rows and predictions; `row_ids` (in
    the loader's order) are the predictions file's ids. `write_files`: False writes no
    predictions or plots even with a folder (training's validations). `task_type`: the
    task (None: detected from the first batch). `split`: the split evaluated, which names
    the predictions file, the plots and the tracked metrics (`val_...`, `test_...`).
    `intervals`: False computes no bootstrap intervals, nor keeps the samples for them
    (training's validations: they are for a final evaluation, and cost seconds).
    `loss_function` scores the loss (None: a model whose forward takes `labels` scores its
    own on batches that carry them). A bad value is refused on construction, by name.
    """

    training_mode: TrainingMode = TrainingMode.SUPERVISED
    precision: Precision | None = None
    decode: Callable[[list[int]], str] | None = None
    distributed: Distributed | None = None
    lockstep: bool = False
    output_transform: OutputTransform | None = None
    class_names: Sequence[str] | None = None
    row_ids: Sequence[str] | None = None
    write_files: bool = True
    task_type: TaskType | None = None
    split: EvaluationMode = EvaluationMode.VALIDATION
    loss_function: Callable[..., Any] | None = None
    intervals: bool = True

    def __post_init__(self) -> None:
        """Refuse a bad value, naming the field, the value and what is allowed; a task,
        split or training mode may be given by its value ("regression", "testing")."""
        mode = _member("training_mode", self.training_mode, TrainingMode)
        object.__setattr__(self, "training_mode", mode)
        object.__setattr__(self, "split", _member("split", self.split, EvaluationMode))
        if self.task_type is not None:
            object.__setattr__(self, "task_type", _member("task_type", self.task_type, TaskType))
        if self.precision is not None and not isinstance(self.precision, Precision):
            allowed = "expected a traineval.training.precision.Precision or None"
            fail("precision", self.precision, allowed)
        for name in ("decode", "output_transform", "loss_function"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                fail(name, getattr(self, name), "expected a callable or None")
        refuse_unreduced(self.loss_function)
        for name in ("lockstep", "write_files", "intervals"):
            boolean(name, getattr(self, name))
        for name in ("class_names", "row_ids"):
            if isinstance(getattr(self, name), str):
                fail(name, getattr(self, name), "expected a list of strings or None")

    @classmethod
    def of(cls, options: dict[str, Any]) -> EvaluationOptions:
        """Options given by keyword (`evaluate_model(..., precision=...)`); an unknown one
        is an error naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in known]
        if unknown:
            raise TypeError(
                f"unknown evaluation option {unknown[0]!r}; expected one of {', '.join(known)}"
            )
        return cls(**options)


def task_of(value: Any, field: str = "task_type") -> TaskType | None:
    """A task given as a `TaskType` or its value ("classification"), or None; another value
    is refused, naming the field and the tasks there are."""
    return None if value is None else _member(field, value, TaskType)


def _member(field: str, value: Any, kind: type[_Choice]) -> _Choice:
    """`value` as a member of the enum `kind` (a member or its value); else an error naming
    the field, the value and the allowed values."""
    try:
        return kind(value)
    except (ValueError, TypeError):
        pass
    allowed = ", ".join(repr(member.value) for member in kind)
    fail(field, value, f"expected one of {allowed} (a {kind.__name__} or its value)")


@dataclasses.dataclass
class EvaluationReport:
    """One evaluation's result.

    `metrics`: the mean loss and the task's metrics (built-in and yours) as floats; `task`;
    `per_class`: each class's (or label's) name, precision, recall, F1 and support
    (classification, multi-label); `confusion`: the confusion matrix when the config lists
    `confusion_matrix`; `intervals`: each metric's bootstrap (low, high) with
    `bootstrap_samples`; `files`: the predictions file and plots written, by kind.
    """

    metrics: dict[str, float]
    task: TaskType
    per_class: list[dict[str, Any]] | None = None
    confusion: np.ndarray | None = None
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def intervals_record(self, config: EvaluationConfig) -> dict[str, Any] | None:
        """The intervals as written to JSON (level, resamples, seed, [low, high] by metric);
        None without intervals."""
        if not self.intervals:
            return None
        return {
            "confidence_level": config.confidence_level,
            "bootstrap_samples": config.bootstrap_samples,
            "bootstrap_seed": config.bootstrap_seed,
            "metrics": {name: list(bounds) for name, bounds in self.intervals.items()},
        }
