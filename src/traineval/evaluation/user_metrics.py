"""The user's own metrics, everywhere a built-in metric goes.

Three kinds are accepted as they are:

- a **streaming metric**: any object with `update(predictions, targets)`, `compute()`,
  `reset()` and `merge(other)` (the `StreamingMetric` protocol; the built-in states of
  `traineval.evaluation.metrics` have the same shape). Its state is updated batch by batch
  on the device; under torchrun each rank's state is sent to the others (pickled: define
  its class at module level) and merged in rank order, so every rank computes the value of
  all samples, each counted once.
- a **torchmetrics** `Metric` (`pip install 'traineval[metrics]'`): updated the same way and
  merged with its `merge_state` (its own synchronisation is switched off, so no sample is
  counted twice); its `higher_is_better` gives the monitor's direction.
- a **function in scikit-learn's shape** `fn(y_true, y_pred) -> float`: the evaluation keeps
  every (target, prediction) pair on the device and calls the function once at the end on
  NumPy arrays (memory grows with the number of samples: 16 bytes per sample for labels,
  8 + 4 x classes with `inputs="probabilities"`). `y_pred` is the predicted class (binary: 0/1
  from the logit's sign), the probabilities (`inputs="probabilities"`: a binary model's
  probability of class 1, as `roc_auc_score` takes it), the prediction (regression) or the
  0/1 label matrix (multi-label). Bootstrap intervals (`bootstrap_samples`) resample its
  pairs as they do the built-in metrics'.

A metric is named by its `name` attribute, else its function or class name in snake case
(`MulticlassF1Score` -> `multiclass_f1_score`); named by import path, a class or a
function of no arguments is built (a factory: `def macro_f1(): return
MulticlassF1Score(3)`) and named after it (`macro_f1`). It is reported as `val_<name>`,
`test_<name>`, ... Its direction (for `monitor_metric`, plateau schedules, `tune`) is
`higher_is_better` when it declares one, else guessed from the name as for built-ins
(losses and errors down, scores up). `metric(fn, ...)` declares a function's name,
direction and inputs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..config import registry
from ..config.code_references import import_object
from ..config.training_config import (
    BUILT_IN_METRICS,
    TaskType,
    metric_is_minimized,
    named_direction,
)
from ..tasks import align_regression
from ..training.exit_codes import UserCodeError, first_line
from ..training.stopping import TrainingInterrupted
from .bootstrap import Bootstrap, function_intervals
from .metrics import class_probabilities

INPUTS = ("labels", "probabilities")
RESERVED = ("loss", "bleu", "rouge_l")  # what an evaluation reports besides the task's metrics
# scikit-learn's metrics that score probabilities: named by import path they need
# `metric(fn, inputs="probabilities")`, or they would be given class labels
PROBABILITY_METRICS = (
    "roc_auc_score", "log_loss", "average_precision_score", "brier_score_loss",
    "top_k_accuracy_score", "d2_log_loss_score",
)  # fmt: skip


@runtime_checkable
class StreamingMetric(Protocol):
    """A metric whose state is updated batch by batch (see the module docstring)."""

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None: ...

    def compute(self) -> Any: ...

    def reset(self) -> None: ...

    def merge(self, other: Any) -> None: ...


def metric(
    fn: Callable[..., float] | None = None,
    *,
    name: str | None = None,
    higher_is_better: bool | None = None,
    inputs: str = "labels",
) -> Any:
    """Declare a scikit-learn-shaped function's name, direction and inputs (`labels` or
    `probabilities`); usable as a decorator, with or without arguments.

    Example:
        >>> @metric(higher_is_better=False)
        ... def balanced_error(y_true, y_pred):
        ...     from sklearn.metrics import balanced_accuracy_score
        ...     return 1 - balanced_accuracy_score(y_true, y_pred)
        >>> balanced_error.metric_name, balanced_error.higher_is_better
        ('balanced_error', False)
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs={inputs!r} is invalid: expected one of {', '.join(INPUTS)}")

    def declare(function: Callable[..., float]) -> DeclaredMetric:
        return DeclaredMetric(function, name or function.__name__, higher_is_better, inputs)

    return declare(fn) if fn is not None else declare


class DeclaredMetric:
    """A function with what `metric` declared about it; the function itself stays untouched
    (declaring scikit-learn's `balanced_accuracy_score` better when lower had marked that
    function so for every later use). It calls the function, has its signature, name and
    module, and pickles by reference where it is a module's attribute (a decorated function),
    else with the function it declares."""

    def __init__(
        self, function: Callable[..., float], name: str, higher: bool | None, inputs: str
    ) -> None:
        functools.update_wrapper(self, function)  # (also __wrapped__: inspect.signature)
        self.function = function
        self.metric_name = name
        self.higher_is_better = higher
        self.metric_inputs = inputs

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        return self.function(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        module, qualname = getattr(self, "__module__", None), getattr(self, "__qualname__", "")
        if module and _attribute(module, qualname) is self:  # @metric(...) def f: f by name
            return (_attribute, (module, qualname))
        declared = (self.metric_name, self.higher_is_better, self.metric_inputs)
        return (DeclaredMetric, (self.function, *declared))

    def __repr__(self) -> str:
        return f"metric({self.function!r}, name={self.metric_name!r})"


def _attribute(module: str, qualname: str) -> Any:
    """`module`'s object at the dotted `qualname` (None where there is none)."""
    found: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


class UserMetric:
    """One of the user's metrics in an evaluation: a fresh copy of what they gave, updated
    with the task's predictions (`template` stays untouched, so evaluations never share a
    state)."""

    def __init__(self, name: str, template: Any) -> None:
        self.name = name
        self.template = template
        self.kind = _kind(template)
        declared = getattr(template, "higher_is_better", None)
        self.minimize = metric_is_minimized(name) if declared is None else not declared
        # lower taken as better for want of a word: said when it is monitored
        self.guessed = declared is None and named_direction(name) is None
        self.inputs = getattr(template, "metric_inputs", "labels")
        self.state: Any = None  # the streaming copy, or the kept (predictions, targets)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.task: TaskType | None = None  # the task of the predictions seen
        self.threshold = 0.5  # multi-label: a label is predicted above this probability

    def start(self, threshold: float = 0.5) -> UserMetric:
        """A copy with an empty state, for one evaluation (`threshold`: the multi-label
        probability above which a label is predicted)."""
        fresh = UserMetric(self.name, self.template)
        fresh.threshold = threshold
        if fresh.kind != "function":
            with _their_code(self.name, "reset"):
                fresh.state = copy.deepcopy(self.template)
                fresh.state.reset()
            if fresh.kind == "torchmetrics":
                fresh.state.sync_on_compute = False  # merged by traineval: no double count
        return fresh

    def update(self, predictions: torch.Tensor, targets: torch.Tensor, task: TaskType) -> None:
        self.task = task
        if self.kind == "function":
            self.pairs.append((targets.detach(), self._function_input(predictions, task)))
            return
        if self.kind == "torchmetrics" and self.state.device != predictions.device:
            self.state = self.state.to(predictions.device)
        if task is TaskType.REGRESSION:
            predictions = align_regression(predictions, targets)
        with _their_code(self.name, "update"):
            self.state.update(predictions, targets)

    def _function_input(self, predictions: torch.Tensor, task: TaskType) -> torch.Tensor:
        """What a scikit-learn-shaped function takes as `y_pred` (see the module docstring)."""
        if task is TaskType.CLASSIFICATION:
            binary = predictions.ndim == 1 or predictions.shape[1] == 1
            if self.inputs == "probabilities":
                probabilities = class_probabilities(predictions.float())
                return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities
            if binary:
                return (predictions.reshape(-1) > 0).long()
            return predictions.argmax(dim=1)
        if task is TaskType.MULTILABEL:
            return (torch.sigmoid(predictions.float()) > self.threshold).long()
        if task is TaskType.GENERATION:  # the greedy tokens, not (B, T, V) logits
            return predictions.argmax(dim=-1)
        return predictions.detach().float()

    def merge(self, other: UserMetric) -> None:
        """Fold in another rank's state, as if this one had seen its samples too."""
        if self.kind == "function":
            self.pairs.extend(other.pairs)
            return
        with _their_code(self.name, "merge"):
            if self.kind == "torchmetrics":
                _merge_torchmetrics(self.state, other.state.to(self.state.device))
            else:
                self.state.merge(other.state)

    def to_cpu(self) -> UserMetric:
        """A copy whose tensors are on the CPU, without the template the user gave (to send
        to other ranks: only the state travels; `adopt` gives the template back)."""
        clone = copy.copy(self)
        clone.template = None
        clone.pairs = [(t.cpu(), p.cpu()) for t, p in self.pairs]
        if self.kind == "torchmetrics":
            clone.state = copy.deepcopy(self.state).cpu()
        elif self.kind == "streaming":
            clone.state = _on_cpu(copy.deepcopy(self.state))
        return clone

    def adopt(self, local: UserMetric) -> None:
        """Take this rank's template of the same metric (after a state came from another)."""
        self.template = local.template

    def compute(self, ignore_index: int) -> float:
        """The metric's value over every sample seen (and merged)."""
        if self.kind != "function":
            with _their_code(self.name, "compute"):
                value = self.state.compute()
            return _scalar(self.name, value)
        truth, predicted = self.arrays(ignore_index)
        with _their_code(self.name, "function"):
            value = self.template(truth, predicted)
        return _scalar(self.name, value)

    def arrays(self, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept (y_true, y_pred) as NumPy arrays, without ignored targets."""
        if not self.pairs:
            raise ValueError(f"metric {self.name!r}: the evaluation saw no samples")
        if self.task is TaskType.GENERATION:  # tokens: batches of any length, one array
            truth = torch.cat([t.reshape(-1).cpu() for t, _ in self.pairs]).numpy()
            predicted = torch.cat([p.reshape(-1).cpu() for _, p in self.pairs]).numpy()
            keep = truth != ignore_index
            return truth[keep], predicted[keep]
        truth = torch.cat([t.reshape(len(t), -1).cpu() for t, _ in self.pairs]).numpy()
        predicted = torch.cat([p.reshape(len(p), -1).cpu() for _, p in self.pairs]).numpy()
        if truth.shape[1] == 1:
            truth = truth[:, 0]
            if self.task is TaskType.CLASSIFICATION:  # a regression target may be -100
                keep = truth != ignore_index
                truth, predicted = truth[keep], predicted[keep]
        if predicted.ndim == 2 and predicted.shape[1] == 1:
            predicted = predicted[:, 0]
        return truth, predicted

    def interval(self, ignore_index: int, bootstrap: Bootstrap) -> tuple[float, float] | None:
        """The bootstrap interval of a function metric (None for streaming ones: their
        states cannot be resampled)."""
        if self.kind != "function":
            return None
        truth, predicted = self.arrays(ignore_index)
        return function_intervals(self.template, truth, predicted, bootstrap)


@contextlib.contextmanager
def _their_code(name: str, call: str) -> Iterator[None]:
    """Inside, the metric `name`'s own code runs (its `call`): what it raises is a
    `UserCodeError` naming the metric, but for what the machine or a stop raises."""
    try:
        yield
    except (UserCodeError, MemoryError, OSError, torch.OutOfMemoryError, TrainingInterrupted):
        raise
    except Exception as error:
        said = first_line(error)
        raise UserCodeError(
            f"metric {name!r}: its {call} raised {type(error).__name__}: {said}"
        ) from error


def _kind(template: Any) -> str:
    if type(template).__module__.startswith("torchmetrics") or hasattr(template, "merge_state"):
        return "torchmetrics"
    if isinstance(template, StreamingMetric):
        return "streaming"
    streaming = ("update", "compute", "reset", "merge")
    has = [name for name in streaming if callable(getattr(template, name, None))]
    if {"update", "compute"} <= set(has):  # streaming, short of a method: not a function
        lacking = ", ".join(name for name in streaming if name not in has)
        raise TypeError(
            f"{template!r} has update() and compute() but no {lacking}(): a streaming metric "
            "needs update, compute, reset and merge (merge folds another rank's state into "
            "this one); it would have been called as a function fn(y_true, y_pred)"
        )
    if callable(template) and not isinstance(template, type):
        return "function"
    raise TypeError(
        f"{template!r} is not a metric: expected a streaming metric (update, compute, reset, "
        "merge), a torchmetrics Metric, or a function fn(y_true, y_pred) -> float"
    )


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value.item())  # a one-element array (numpy's 0-d results)
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None:  # an array's repr spans lines, and the first one is all said
        said = f"{type(value).__name__} of shape {tuple(shape)}"
    else:
        text = " ".join(repr(value).split())
        said = f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"
    raise UserCodeError(
        f"metric {name!r} computed {said}; a metric gives one number (give per-class values "
        "as separate metrics)"
    )


def metric_name(template: Any) -> str:
    """The name a metric is reported under (see the module docstring)."""
    declared = getattr(template, "metric_name", None) or getattr(template, "name", None)
    if isinstance(declared, str) and declared:
        return declared
    return _snake(getattr(template, "__name__", None) or type(template).__name__)


def _snake(name: str) -> str:
    """`MulticlassF1Score` -> `multiclass_f1_score`; snake case stays as it is."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def named(given: Iterable[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, metric) pairs of a mapping {name: metric} or a list (each named by
    `metric_name`)."""
    if isinstance(given, Mapping):
        return list(given.items())
    return [(metric_name(m), m) for m in given]


def user_metrics(pairs: Iterable[tuple[str, Any]], built_in: Iterable[str]) -> list[UserMetric]:
    """The user's metrics from (name, metric) pairs; a name already taken (a built-in's,
    another's) is refused."""
    taken = {*built_in, *RESERVED}
    found: list[UserMetric] = []
    for name, template in pairs:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise ValueError(f"metric name {name!r} is invalid: expected letters, digits and _")
        if name in taken:
            raise ValueError(
                f"metric name {name!r} is taken (a built-in metric, or another of yours): "
                "name it otherwise, e.g. metrics={'my_" + name + "': ...}"
            )
        taken.add(name)
        found.append(UserMetric(name, template))
    return found


def register_metric(name: str, template: Any) -> None:
    """Make `template` (any of the three kinds) nameable in `EvaluationConfig`'s metric lists
    by `name`, as a built-in is. Registering the same object again is not an error; a
    name that is not an identifier, or a built-in's, is refused (the built-in would win)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
        raise ValueError(f"metric name {name!r} is invalid: expected letters, digits and _")
    built_in = {m for names in BUILT_IN_METRICS.values() for m in names} | set(RESERVED)
    if name in built_in:
        raise ValueError(
            f"metric name {name!r} is a built-in metric's, which an evaluation would compute "
            f"instead of yours: register it as, e.g., 'my_{name}'"
        )
    _kind(template)
    registry.add_metric(name, template)


def resolve(entry: str, field: str) -> tuple[str, Any]:
    """A metric list's entry that is not a built-in name: a registered name, or an import
    path to a function, a metric object or a class built without arguments."""
    registered = registry.metrics()
    if entry in registered:
        return entry, registered[entry]
    found = import_object(entry, field=field)
    attribute = entry.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    name = metric_name(found) if not isinstance(found, type) else None
    if isinstance(found, type) or _builds_a_metric(found):
        try:
            found = found()
        except TypeError as error:
            raise ValueError(
                f"{field}: {entry!r} needs arguments to build its metric ({error}); name a "
                "function that builds it instead (def my_f1(): return MulticlassF1Score(3))"
            ) from None
        declared = getattr(found, "metric_name", None) or getattr(found, "name", None)
        # what it is called where it is named: the factory's name, or the class's (snake case)
        name = declared if isinstance(declared, str) and declared else _snake(attribute)
    try:
        _kind(found)
    except TypeError as error:
        raise ValueError(f"{field}: {entry!r} {error}") from None
    if getattr(found, "__name__", None) in PROBABILITY_METRICS and not hasattr(
        found, "metric_inputs"
    ):
        raise ValueError(
            f"{field}: {entry!r} scores probabilities, and a metric named by import path is "
            "given class labels; declare it in your module, e.g. "
            f"auc = traineval.evaluation.metric({attribute}, inputs='probabilities'), and "
            "name that (or use the built-in roc_auc / log_loss / brier_score)"
        )
    return (attribute if name in (None, "<lambda>") else name), found


def _builds_a_metric(found: Any) -> bool:
    """A function of no required arguments that cannot take (y_true, y_pred): a factory of
    a metric (a scikit-learn-shaped metric takes y_true and y_pred, with defaults or as
    *args too)."""
    if not callable(found) or _kind_or_none(found) in ("streaming", "torchmetrics"):
        return False
    try:
        parameters = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return False  # it takes (y_true, y_pred)
    return all(p.default is not p.empty for p in positional)


def _kind_or_none(template: Any) -> str | None:
    try:
        return _kind(template)
    except TypeError:
        return None


def _on_cpu(value: Any) -> Any:
    """`value` (a user's streaming state) with its tensors on the CPU, attributes and
    containers included (to send to other ranks)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        for key, item in vars(value).items():
            setattr(value, key, _on_cpu(item))
    return value


def _merge_torchmetrics(mine: Any, theirs: Any) -> None:
    """Fold `theirs` into `mine`: `merge_state`, which refuses a metric whose
    `full_state_update` is not False (a user's subclass leaves it unset; it concerns only
    `forward`, which traineval never calls); those reduce their states as torchmetrics' own
    distributed sync does."""
    if mine.full_state_update is False and not mine.dist_sync_on_step:
        mine.merge_state(theirs)
    else:
        mine._reduce_states(theirs.metric_state)
