"""Task detection and the default loss of each task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config.training_config import TaskType


def detect_task(
    outputs: torch.Tensor, targets: torch.Tensor | None = None, *, multilabel: bool = True
) -> TaskType:
    """Tell the task from the shapes of a model's outputs (and the targets' dtype).

    `(N, C)` scores with C > 1 -> classification; `(N,)` or `(N, 1)` -> regression;
    `(N, T, V)` -> generation (language modelling). Targets of the `(N, C)` outputs' shape
    holding only 0 and 1 mean multi-label classification (scikit-learn's reading of such a
    matrix), other float targets of the outputs' shape regression with several outputs
    (`multilabel=False`: always). Pass `task_type` explicitly to override (e.g. binary
    classification with one logit, or regression onto 0/1 values).
    """
    if multilabel and targets is not None and is_multilabel(outputs, targets):
        return TaskType.MULTILABEL
    if targets is not None and targets.is_floating_point() and targets.shape == outputs.shape:
        return TaskType.REGRESSION
    if outputs.ndim == 3:
        return TaskType.GENERATION
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return TaskType.CLASSIFICATION
    return TaskType.REGRESSION


def detect_labeled_task(
    outputs: torch.Tensor,
    targets: torch.Tensor | None,
    ignore_index: int = -100,
    *,
    supervised: bool = True,
) -> TaskType:
    """`detect_task` for scoring, where one output a sample beside integer labels 0 and 1
    (or `ignore_index`) is a binary classifier's logit (by its shapes alone it is
    regression, and a perfect classifier was scored as the MSE of logit against label).
    Integer targets with other values, float and bool targets stay regression; without
    targets (`supervised=False`, or none given) it is `detect_task`'s reading."""
    task = detect_task(outputs, targets, multilabel=supervised)
    if targets is None or task is not TaskType.REGRESSION or not supervised:
        return task
    if targets.is_floating_point() or targets.dtype == torch.bool:
        return task
    if not one_logit(outputs, targets) or targets.numel() != outputs.shape[0]:
        return task
    label = (targets == 0) | (targets == 1) | (targets == ignore_index)
    return TaskType.CLASSIFICATION if bool(label.all()) else task


def is_multilabel(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether `targets` is a 0/1 indicator matrix of the `(N, C)` outputs' shape (reads the
    targets: a device sync, done once when the task is detected)."""
    if outputs.ndim != 2 or outputs.shape[1] < 2 or targets.shape != outputs.shape:
        return False
    return bool(((targets == 0) | (targets == 1)).all())


class MultilabelBCE(nn.Module):
    """Binary cross-entropy on each of the C logits (`BCEWithLogitsLoss`), averaged over
    samples and labels; 0/1 targets may be integers."""

    reads_prediction = True  # takes the prediction tensor, not a model output

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


class RegressionMSE(nn.Module):
    """Mean squared error that lines up `(N, 1)` predictions with `(N,)` targets.

    `nn.MSELoss` would broadcast that pair to an N x N matrix; this reshapes instead and
    refuses shapes that do not hold the same number of values.
    """

    reads_prediction = True  # takes the prediction tensor, not a model output

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(align_regression(outputs, targets), targets.to(outputs.dtype))


def align_regression(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reshape predictions to the targets' shape when only singleton dimensions differ."""
    if outputs.shape == targets.shape:
        return outputs
    if outputs.numel() != targets.numel():
        raise ValueError(
            f"regression outputs of shape {tuple(outputs.shape)} do not match targets of shape "
            f"{tuple(targets.shape)}"
        )
    return outputs.reshape(targets.shape)


class SequenceCrossEntropy(nn.Module):
    """Cross-entropy over `(N, T, V)` logits and `(N, T)` token ids, skipping `ignore_index`."""

    reads_prediction = True  # takes the prediction tensor, not a model output

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )


def one_logit(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether classification outputs are a binary classifier's one logit a sample: `(N, 1)`,
    or `(N,)` beside `(N,)` labels (not one sample's `(C,)` scores beside its label)."""
    return (outputs.ndim == 2 and outputs.shape[1] == 1) or (
        outputs.ndim == 1 and targets.ndim == 1
    )


def class_ids(target: torch.Tensor) -> torch.Tensor:
    """Class labels as cross-entropy takes them: `(N,)` integers. A `(N, 1)` column (a
    table's label column) is flattened; whole numbers as floats (labels from numpy or
    pandas) become integers, and on the CPU other floats are refused."""
    if target.ndim == 2 and target.shape[1] == 1:
        target = target.reshape(-1)
    if not target.is_floating_point():
        return target
    whole = target == target.round()
    if target.device.type != "cpu":  # a device-side assert, as cross-entropy's own: no sync
        torch._assert_async(whole.all(), "class labels must be whole numbers")
    elif not bool(whole.all()):
        raise ValueError(
            f"class labels must be whole numbers; this batch has {target.dtype} labels such as "
            f"{target[~whole][0].item():g}"
        )
    return target.long()


class ClassCrossEntropy(nn.CrossEntropyLoss):
    """Classification's loss: cross-entropy over C class scores; over one score a row (a
    binary classifier with one logit, outputs `(N, 1)` or `(N,)`) the binary cross-entropy
    of its sigmoid against labels 0 and 1, with the same `ignore_index`, class weights (of
    classes 0 and 1) and label smoothing. Softmax over one class is 1 whatever the score:
    cross-entropy would be 0 and train nothing."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if one_logit(input, target):
            return self._binary(input.reshape(-1), target.reshape(-1))
        if input.ndim == 2 and target.shape != input.shape:  # not class probabilities
            target = class_ids(target)
        return super().forward(input, target)

    def _binary(self, logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the two scores (0, logit): the binary cross-entropy of the
        logit's sigmoid, with cross-entropy's own ignore_index, weights and smoothing."""
        valid = (target == 0) | (target == 1) | (target == self.ignore_index)
        if target.device.type != "cpu":  # a device-side assert, as cross-entropy's: no sync
            torch._assert_async(valid.all(), "a binary classifier takes labels 0 and 1")
        elif not bool(valid.all()):
            kept = target[target != self.ignore_index]
            raise ValueError(
                "a binary classifier with one logit takes labels 0 and 1; labels in this "
                f"batch range from {kept.min().item():g} to {kept.max().item():g} (without "
                "task_type, one output beside integer labels 0 and 1 in the first batch is "
                "read as a binary classifier: pass task_type='regression' for values to "
                "regress)"
            )
        if target.is_floating_point():  # 0/1 labels as floats (an (N, 1) column, say)
            target = target.long()
        scores = torch.stack([torch.zeros_like(logit), logit], dim=1)
        return super().forward(scores, target)


class BalancedCrossEntropy(ClassCrossEntropy):
    """Cross-entropy with class weights counted from the training labels
    (`class_weights: balanced`). A class the training data never shows, where the model
    outputs more classes than those labels name, weighs 1.0: a training sample's mean
    weight, so its validation samples count like an average one."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = input.shape[1] if input.ndim > 1 else input.shape[0]
        classes = 2 if one_logit(input, target) else classes  # one logit: classes 0 and 1
        weight = self.weight
        if weight is not None and classes > weight.numel():
            self.weight = torch.cat([weight, weight.new_ones(classes - weight.numel())])
        return super().forward(input, target)


MEAN_REDUCTIONS = ("mean", "batchmean")  # (KLDivLoss's batchmean: the mean a sample)


def refuse_unreduced(loss_function: Any, name: str = "loss_function") -> None:
    """Refuse a torch loss that sums or does not reduce (`reduction="sum"` / `"none"`):
    each batch's loss is a mean, weighed by the batch's samples, which keeps accumulation,
    DDP and the epoch and validation losses exact; a sum would be weighed again (a
    "none" fails at the first batch)."""
    reduction = getattr(loss_function, "reduction", "mean")
    if isinstance(loss_function, nn.modules.loss._Loss) and reduction not in MEAN_REDUCTIONS:
        raise ValueError(
            f"{name}={type(loss_function).__name__}(reduction={reduction!r}) is refused: "
            "traineval takes each batch's mean loss and weighs it by the batch's samples "
            "(exact under accumulation and DDP); use reduction='mean' (the default)"
        )


def scores_next_token(loss_function: Any) -> bool:
    """Whether a loss is traineval's token loss (the default's), which scores a causal LM's
    logits at t against the label at t + 1 (see `traineval.training.batches.label_shift`); a loss of
    your own gets the targets as they are."""
    return isinstance(loss_function, (AutoLoss, SequenceCrossEntropy))


def default_loss(
    task_type: TaskType | None,
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    balanced: bool = False,
) -> nn.Module | AutoLoss:
    """The loss a task trains with unless the user passes one; `None` picks it from the data.

    `label_smoothing` and `class_weight` shape the cross-entropy of classification (label
    smoothing also that of token-level generation); `balanced` says the class weights were
    counted from the training labels, which name only the classes training shows: further
    classes weigh 1.0 (`BalancedCrossEntropy`)."""
    if task_type is None:
        return AutoLoss(
            ignore_index,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            balanced=balanced,
        )
    return task_loss(task_type, ignore_index, label_smoothing, class_weight, balanced)


def task_loss(
    task_type: TaskType,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    balanced: bool = False,
) -> nn.Module:
    """Cross-entropy for classification, MSE for regression, per-label binary cross-entropy
    for multi-label classification, token cross-entropy for generation."""
    if class_weight is not None and task_type is not TaskType.CLASSIFICATION:
        raise ValueError(f"class_weights apply to classification; this task is {task_type.value}")
    if label_smoothing and task_type in (TaskType.REGRESSION, TaskType.MULTILABEL):
        raise ValueError(
            f"label_smoothing={label_smoothing} applies to classification and token-level "
            f"generation; this task is {task_type.value}: set label_smoothing=0"
        )
    if task_type is TaskType.CLASSIFICATION:
        kind = BalancedCrossEntropy if balanced else ClassCrossEntropy
        return kind(weight=class_weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if task_type is TaskType.REGRESSION:
        return RegressionMSE()
    if task_type is TaskType.MULTILABEL:
        return MultilabelBCE()
    return SequenceCrossEntropy(ignore_index=ignore_index, label_smoothing=label_smoothing)


class AutoLoss:
    """Picks the task's default loss from the first batch it sees (see `detect_task`).

    A plain callable, not a Module: one less module call per step.
    """

    reads_prediction = True

    def __init__(
        self,
        ignore_index: int = -100,
        *,
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        balanced: bool = False,
    ) -> None:
        self._ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.class_weight, self.balanced = class_weight, balanced
        self.resolved: nn.Module | None = None
        self._forward: Any = None
        self.task_type: TaskType | None = None

    @property
    def ignore_index(self) -> int:
        # Both losses it can pick for integer targets skip this index; float targets ignore it.
        return self._ignore_index

    @property
    def weight(self) -> torch.Tensor | None:
        """The class weights of the cross-entropy it picks (what a batch averages over)."""
        chosen = getattr(self.resolved, "weight", None)
        return chosen if chosen is not None else self.class_weight

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            self._forward = self.resolve(outputs, targets).forward  # ours, no hooks: skip __call__
            if self.task_type is TaskType.MULTILABEL:  # read from one batch: checked on
                self._forward = self._multilabel
        return self._forward(outputs, targets)

    def _multilabel(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check_multilabel(targets)
        assert self.resolved is not None
        return self.resolved.forward(outputs, targets)

    def check_multilabel(self, targets: torch.Tensor) -> None:
        """Multi-label, as the first batch's 0/1 targets said: a later batch whose targets
        are not 0/1 (counts that began with 0s and 1s) is refused, naming the guess (on a
        device, a device-side assert, as cross-entropy's own: no sync)."""
        zero_one = ((targets == 0) | (targets == 1)).all()
        if targets.device.type != "cpu":
            torch._assert_async(zero_one, "multi-label targets must be 0 or 1")
        elif not bool(zero_one):
            raise ValueError(
                "targets other than 0 and 1 in a multi-label run: the task was read as "
                "multi-label classification from the first batch's 0/1 targets; if these "
                "are values to regress, pass task_type=regression"
            )

    def _labels_as_floats(self, outputs: torch.Tensor, targets: torch.Tensor) -> bool:
        """Whether float targets are class labels: one whole number (or `ignore_index`) a
        sample beside `(N, C)` scores (labels from numpy or pandas), which no regression
        reading fits. (Reads the targets: done once, when the task is detected.)"""
        if outputs.ndim != 2 or outputs.shape[1] < 2 or targets.numel() != outputs.shape[0]:
            return False
        label = (targets == targets.round()) & (targets >= 0)
        return bool((label | (targets == self._ignore_index)).all())

    def resolve(self, outputs: torch.Tensor, targets: torch.Tensor) -> nn.Module:
        """The loss for batches like this one, chosen the first time (see `detect_task`)."""
        if self.resolved is None:
            if is_multilabel(outputs, targets):
                self.task_type = TaskType.MULTILABEL
            elif targets.is_floating_point() and not self._labels_as_floats(outputs, targets):
                self.task_type = TaskType.REGRESSION
            else:
                self.task_type = detect_task(outputs)
                if self.task_type is TaskType.REGRESSION:
                    raise ValueError(
                        f"outputs of shape {tuple(outputs.shape)} with integer targets: pass "
                        "task_type (classification: a binary classifier's one logit, labels "
                        "0 and 1; regression: convert the targets to float)"
                    )
            self.resolved = task_loss(
                self.task_type,
                self._ignore_index,
                self.label_smoothing,
                self.class_weight,
                self.balanced,
            )
        return self.resolved


class CompiledLoss:
    """A loss function run through `torch.compile`; an AutoLoss compiles the loss it picks.

    The original stays in charge of what the step functions read from it (`ignore_index`,
    class weights, its signature); the evaluator keeps calling it uncompiled.
    """

    def __init__(self, loss_function: Any, mode: str = "default") -> None:
        self.loss_function = loss_function
        self.mode = mode
        self._compiled: Any = None
        if not isinstance(loss_function, AutoLoss):
            self._compiled = torch.compile(loss_function, mode=mode)

    def __call__(self, *args: Any) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self.loss_function.resolve(*args), mode=self.mode)
        loss = self.loss_function
        if isinstance(loss, AutoLoss) and loss.task_type is TaskType.MULTILABEL:  # one batch's
            loss.check_multilabel(args[1])
        return self._compiled(*args)
