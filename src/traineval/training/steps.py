"""What a training step is, below the loop and the modes: the step function's protocol and
its output (`StepOutput`), the loss weights that make accumulation and DDP exact, and the
checked loss call. The loop reads these; every mode builds on them (`traineval.modes`
re-exports them)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..tasks import CompiledLoss
from .batches import (  # noqa: F401  (the batch rules, re-exported for the modes)
    TARGET_KEYS,
    batch_size_of,
    forward,
    move_to_device,
    split_batch,
)

LossFunction = Callable[..., torch.Tensor]


@dataclasses.dataclass
class StepOutput:
    """What a step function returns for one micro-batch.

    Attributes:
        loss: scalar, the mean loss over the micro-batch's items.
        weight: how many items that mean is over (samples, or non-ignored tokens); the loop
            weights micro-batches by it so an accumulation window equals one big batch.
            An int, or a 0-d tensor on the device (read without a host sync).
        num_samples: samples in the micro-batch, for throughput.
        outputs: the model's outputs, for metrics.
        targets: what the outputs are compared with, for metrics.
        metrics: the mode's own per-step numbers (floats, or 0-d device tensors: they are
            read at the next log step, not now); the loop logs each as `train_<name>`,
            averaged over the micro-batches since the last log.
        terms: for losses that are sums of means over different item sets (semi-supervised:
            a mean over the labeled samples plus one over the unlabeled), a 1-d tensor of
            those means, in the order of the per-term counts the step's `weight()` returns.
            Under accumulation or DDP the loop then weighs each term by its own share of the
            window's items, so the window's gradient equals one big batch's; `loss` is
            their sum.
    """

    loss: torch.Tensor
    weight: int | torch.Tensor
    num_samples: int
    outputs: Any = None
    targets: Any = None
    metrics: dict[str, float | torch.Tensor] | None = None
    terms: torch.Tensor | None = None


class StepFunction(Protocol):
    """A training mode's step: one micro-batch in, its loss (and what metrics need) out.

    A step that keeps state across calls (PPO: the rollout being trained on and the
    environments) also defines `state_dict()` (tensors and plain values) and
    `load_state_dict(state)`: checkpoints carry it, per rank, and a resume puts it back.
    A step that reads the moving average of the weights (Mean Teacher's teacher) defines
    `use_weight_average(average)`: it receives the loop's `WeightAverage` (None without
    `ema_decay`).
    """

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput: ...

    def weight(self, batch: Any) -> int | torch.Tensor:
        """The items the loss of `batch` averages over, known before the forward pass (a
        1-d tensor of per-term counts when the step returns `StepOutput.terms`)."""
        ...


def window_share(out: StepOutput, share: int | float | torch.Tensor) -> torch.Tensor:
    """The micro-batch's part of the window's loss: its mean weighed by its share of the
    window's items, or, for per-term means, each term by its own share."""
    if out.terms is None:
        if isinstance(share, torch.Tensor) and share.ndim:
            raise ValueError(
                f"the step's weight() returned per-term counts of shape "
                f"{tuple(share.shape)} but its StepOutput has no terms"
            )
        return out.loss * share
    if not isinstance(share, torch.Tensor) or share.shape != out.terms.shape:
        raise ValueError(
            f"StepOutput.terms has shape {tuple(out.terms.shape)} but the step's weight() "
            f"returned {share!r}: expected one count per term"
        )
    return (out.terms * share).sum()


def loss_with_gradient(
    value: torch.Tensor, params: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]
) -> torch.Tensor:
    """A loss that reads `value` but whose gradient with respect to `params` is `gradients`.

    For modes whose update direction is not the gradient of their loss (FedAvg's and
    Reptile's `weights - trained weights`): the loop's backward pass puts the direction in
    `.grad` and the optimizer applies it like any other gradient. (A complex parameter's
    term is Re(sum(p * conj(g))), whose gradient torch gives as g.)
    """
    terms = [(p * g.conj()).real.sum() for p, g in zip(params, gradients, strict=True)]
    surrogate = torch.stack(terms).sum()
    return value + (surrogate - surrogate.detach())


class Updates:
    """The loop's "loader" for modes whose step makes its own data (federated rounds, policy
    updates from fresh episodes): `per_epoch` placeholder items, one loop update each."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch = per_epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[int]:
        yield from range(self.per_epoch)


def loss_weight(
    loss_function: Any, targets: torch.Tensor, num_samples: int, exact: bool = False
) -> int | torch.Tensor:
    """How many items a mean-reduced loss averaged over.

    A loss with class-index targets and an `ignore_index` (cross-entropy, NLL) averages over
    the targets it keeps, weighted by its class weights when it has them: that sum is the
    weight of token-level `(N, T)` targets always, and of sample-level `(N,)` targets when
    the loss has class weights or `exact` is asked for (a window's gradient shares, and
    evaluation). Otherwise, as for every other loss, the sample count: a plain int, no
    device work per step (the common classification step logs its loss by samples).
    """
    ignore_index = getattr(loss_function, "ignore_index", None)
    if ignore_index is None or targets is None or targets.is_floating_point():
        return num_samples
    class_weight = getattr(loss_function, "weight", None)
    if targets.ndim < 2 and class_weight is None and not exact:
        return SampleCount(num_samples, targets, ignore_index)
    kept = targets != ignore_index
    if class_weight is not None:
        safe = torch.where(kept, targets, 0)
        return (class_weight.to(targets.device)[safe] * kept).sum()
    return kept.sum()


class SampleCount(int):
    """A micro-batch's sample count, standing in for the targets its loss kept: the exact
    count is read only when asked (`kept()`), because a batch whose every target is
    `ignore_index` has a NaN mean over no items, and the log tells that from a failure."""

    targets: torch.Tensor
    ignore_index: int

    def __new__(cls, count: int, targets: torch.Tensor, ignore_index: int) -> SampleCount:
        counted = super().__new__(cls, count)
        counted.targets, counted.ignore_index = targets, ignore_index
        return counted

    def kept(self) -> int:
        """How many targets are not `ignore_index` (a device sync)."""
        return int((self.targets != self.ignore_index).sum())


def items_of(weight: int | torch.Tensor) -> float:
    """The items behind a micro-batch's weight (a device read for a tensor)."""
    return float(weight.kept() if isinstance(weight, SampleCount) else weight)


def compiled_loss(loss_function: LossFunction, compile_mode: str | None) -> LossFunction:
    """`loss_function` through `torch.compile` in `compile_mode`; None leaves it eager."""
    if compile_mode is None:
        return loss_function
    return CompiledLoss(loss_function, compile_mode)


def count_required_args(function: Any) -> int:
    """How many positional arguments a loss takes (1: `loss(outputs)`, 2: `loss(outputs, y)`)."""
    target = function.forward if isinstance(function, nn.Module) else function
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(
        1
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )


def checked_loss(
    loss_function: LossFunction, outputs: Any, targets: Any, *, compute: LossFunction
) -> torch.Tensor:
    """`compute(outputs, targets)`, with torch's errors about them said as a sentence (a
    label outside the classes, shapes that do not fit) and the result checked to be a
    scalar tensor."""
    try:
        loss = compute(outputs, targets)
    except (IndexError, RuntimeError, ValueError) as error:
        name = _loss_name(loss_function)
        raise ValueError(_loss_failure(name, outputs, targets, error)) from error
    if type(loss) is torch.Tensor and loss.ndim == 0 and loss.requires_grad:  # the hot path
        return loss
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_function {_loss_name(loss_function)} returned {type(loss).__name__} "
            f"{loss!r}; it must return a scalar tensor that carries the graph (compute it "
            "with torch operations)"
        )
    if loss.ndim != 0:
        raise ValueError(
            f"loss_function {_loss_name(loss_function)} returned a tensor of shape "
            f"{tuple(loss.shape)}; it must return a scalar: reduce it (.mean(), or "
            "reduction='mean')"
        )
    if not loss.requires_grad and torch.is_grad_enabled():  # (evaluation runs without)
        raise ValueError(
            f"loss_function {_loss_name(loss_function)} returned a loss that carries no "
            "graph to the model's weights (computed from detached or .item() values, or "
            "under torch.no_grad()): compute it from the outputs with torch operations"
        )
    return loss


def _loss_name(loss_function: LossFunction) -> str:
    """How an error names the loss (asked only when it fails: `getattr` on a module that
    lacks the name raises inside torch, which costs more than the check it names)."""
    name = getattr(loss_function, "__name__", type(loss_function).__name__)
    if type(loss_function).__module__.startswith("traineval"):
        name = f"traineval's default loss ({name})"
    return name


def _loss_failure(name: str, outputs: Any, targets: Any, error: BaseException) -> str:
    """What went wrong between the model's outputs and the targets, for a person."""
    shapes = (
        f"outputs {_shape(outputs)}, targets {_shape(targets)}"
        if isinstance(outputs, torch.Tensor)
        else f"targets {_shape(targets)}"
    )
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    ours = name.startswith("traineval's")
    subject = name if ours else f"the loss {name}"
    if isinstance(targets, torch.Tensor) and targets.ndim == 0:  # no batch dimension
        return (
            f"{subject} cannot take this batch ({shapes}): its target is one value with no "
            "batch dimension, as a loader yields single samples (a DataLoader with "
            "batch_size=None): give the loader a batch_size"
        )
    if "out of bounds" in text and isinstance(targets, torch.Tensor) and targets.numel():
        classes = outputs.shape[1] if isinstance(outputs, torch.Tensor) and outputs.ndim > 1 else 0
        return (
            f"a target label is outside the model's {classes} classes: labels in this batch "
            f"range from {int(targets.min())} to {int(targets.max())} ({shapes}); labels must "
            f"be in [0, {classes}): give the model one output per class, or relabel the data"
        )
    sizes = re.search(r"for all (\d+) classes .* of shape: \[(\d+)\]", text)
    if sizes is not None:
        wanted, weights = sizes.groups()
        return (
            f"{subject} has {weights} class weights, but the model outputs {wanted} "
            f"classes ({shapes}): give one weight per class (class_weights)"
        )
    if isinstance(error, ValueError) and ours:  # our own sentence
        return f"{subject} cannot take this batch ({shapes}): {text}"
    return (
        f"{subject} cannot take this batch ({shapes}): {text}; check that the model's "
        "output has one row per sample and the size the loss expects (classes for "
        "cross-entropy, targets' shape for regression losses)"
    )


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__
