"""One optimizer update from a window of micro-batches: the loop's hot path.

`accumulate` runs forward and backward over the window, each micro-batch's loss weighted by
its share of the window's items (over every rank when data-parallel), so the gradient equals
one big batch's; `step` unscales (fp16), clips, applies the non-finite policy, steps the
optimizer and the schedule, folds the weights into their moving average and records the
step on the device (no sync). Nothing here reads a config: `UpdateRule` says how.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ..runs.train_state import TrainState
from ..system.distributed import Distributed, collectives_inside
from .averaging import WeightAverage
from .batches import move_to_device
from .exit_codes import StepOutputError
from .optim import sparse_gradient_modules
from .precision import Precision
from .skips import NonFiniteSkips
from .steplog import StepLog
from .steps import StepFunction, StepOutput, window_share
from .train_log import TrainLog


@dataclasses.dataclass
class UpdateRule:
    """How the loop turns micro-batches into optimizer updates."""

    step_fn: StepFunction
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    precision: Precision | None = None  # None: fp32
    accumulation_steps: int = 1
    max_grad_norm: float | None = None  # None: no clipping
    skip_non_finite: int = 0  # 0: stop on the first non-finite step; N: skip, stop after N
    weight_average: WeightAverage | None = None  # EMA of the weights


@dataclasses.dataclass
class Placement:
    """Where the loop runs: the device, the module the steps call, the data-parallel job."""

    device: torch.device
    forward_model: nn.Module | None = None  # e.g. the torch.compile'd or DDP module
    job: Distributed | None = None
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None  # DDP's
    average_gradients: bool = False  # the loop all-reduces (modes without a DDP wrapper)


class WindowUpdate:
    """Turns a window of micro-batches into one update of `model` (see the module docstring);
    `log` keeps what the steps leave for the `train` record, read every `log_every` updates
    (with each layer's gradient norm when `layer_norms`)."""

    def __init__(
        self,
        rule: UpdateRule,
        placement: Placement,
        model: nn.Module,
        log_every: int,
        layer_norms: bool = False,
    ) -> None:
        self.rule = rule
        self.step_fn = rule.step_fn
        self.optimizer = rule.optimizer
        self.scheduler = rule.scheduler
        self.device = placement.device
        self.precision = rule.precision or Precision("fp32", self.device.type, None)
        self.max_grad_norm = rule.max_grad_norm
        self.weight_average = rule.weight_average
        self.job = placement.job or Distributed()
        self.no_sync = placement.no_sync  # DDP's: skip the gradient all-reduce inside a window
        # Modes without a DDP wrapper: average the window's gradients over the ranks here.
        self.average_gradients = placement.average_gradients
        self.skips = NonFiniteSkips(model, rule.skip_non_finite)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sparse = sparse_gradient_modules(model)
        if sparse and self.job.enabled:  # DDP and the all-reduce here take dense gradients
            raise ValueError(
                f"the model's {sparse[0] or type(model).__name__!r} (an embedding with "
                "sparse=True) makes sparse gradients, which are not averaged over ranks under "
                "torchrun: use sparse=False"
            )
        self.sparse_gradients = bool(sparse)
        _refuse_a_step_without_weight(self.step_fn, rule.accumulation_steps > 1 or self.job.enabled)
        names = {id(p): name for name, p in model.named_parameters()}
        named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(self.params)]
        self.steps = StepLog(self.device, capacity=min(log_every, 4096))
        self.log = TrainLog(self.steps, named, self.job, layer_norms)
        scaler = self.precision.scaler
        self._scale = scaler.get_scale() if scaler is not None else None

    def accumulate(self, model: nn.Module, window: list[Any]) -> int:
        """Forward and backward over one window; gradients equal those of one big batch.
        Returns the window's sample count."""
        if self.device.type != "cpu":
            window = [move_to_device(batch, self.device) for batch in window]
        shares = self._shares(window)
        scaler = self.precision.scaler
        samples = 0
        last = len(window) - 1
        for i, batch in enumerate(window):
            # DDP all-reduces gradients in the window's last backward pass only.
            skip_sync = self.no_sync is not None and i < last
            with (
                self._collectives() if self.job.enabled else nullcontext(),
                self.no_sync() if skip_sync else nullcontext(),  # type: ignore[misc]
            ):
                with self.precision.autocast():
                    out = self.step_fn(model, batch)
                if type(out) is not StepOutput or type(out.loss) is not torch.Tensor:
                    _check_step_output(self.step_fn, out)
                loss = out.loss
                if loss.ndim != 0 or not loss.requires_grad:
                    _check_loss(self.step_fn, loss)
                scaled = window_share(out, shares[i]) if shares else loss
                self.log.add(loss, out.weight, out.metrics)
                samples += out.num_samples
                del out  # its outputs (a language model's logits: GBs) die before backward
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return samples

    def _collectives(self) -> AbstractContextManager[None]:
        """Under torchrun: a transport error in the pass (DDP's gradient all-reduce, FSDP's
        gathers) names the pass and that another rank probably failed."""
        return collectives_inside(self.job, "the forward and backward pass (their collectives)")

    def _shares(self, window: list[Any]) -> list[int | float | torch.Tensor]:
        """Each micro-batch's share of the window's items (none for one batch alone)."""
        if len(window) == 1 and not self.job.enabled:
            return []
        # Normalise by the whole window's item count, known before any forward pass.
        weights = [self.step_fn.weight(batch) for batch in window]
        total = sum(weights[1:], start=weights[0])
        if self.job.enabled:
            # DDP averages gradients over ranks: weigh by this rank's share of all items.
            total = self.job.sum_tensor(total) / self.job.world_size
        if isinstance(total, torch.Tensor):
            # a window (or a term) with no items: its shares are 0, not 0/0
            total = total.clamp(min=1e-12)
        return [weight / total for weight in weights]

    def step(self, state: TrainState, window_start: int, logging_next: bool) -> bool:
        """Unscale (fp16), clip the window's gradient, step, advance the schedule.
        `logging_next`: the coming update is a log step (its gradient norms are measured).

        Returns whether an update happened: an fp16 step the GradScaler skipped (inf/NaN
        gradients), or a non-finite step under the skip policy, is not an update.
        """
        scaler = self.precision.scaler
        if self.average_gradients:
            self.job.average_gradients(self.params)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        norm = self._gradient_norm(logging_next)
        if logging_next:
            self.log.measure_layers()
        measured = self._norm() if norm is None and self.skips.limit else norm
        if self.skips.limit and not self.skips.finite(self.steps, measured):
            self.skips.undo(scaler)
            return self._skip(state, "non-finite loss or gradient")
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
            scale = scaler.get_scale()  # a sync, only with fp16: was the step skipped?
            skipped = self._scale is not None and scale < self._scale
            self._scale = scale
            if skipped:
                return self._skip(state, "fp16 overflow, the GradScaler lowered its scale")
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            _step_schedule(self.scheduler)
        if self.weight_average is not None:
            self.weight_average.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.consecutive_non_finite = 0
        self.steps.close_step(state.global_step, state.epoch, window_start, norm)
        return True

    def _gradient_norm(self, logging_next: bool) -> torch.Tensor | None:
        """Clip to `max_grad_norm` (returning the norm before clipping), or measure the norm
        on log steps only when there is no clipping."""
        if self.max_grad_norm is None:
            return self._norm() if logging_next else None
        if self.sparse_gradients:
            return _clip_with_sparse(self.params, self.max_grad_norm)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: replicated

    def _norm(self) -> torch.Tensor:
        """The window's gradient norm, unclipped: for a log step, and for the skip policy
        where nothing measured it (a NaN gradient under a finite loss is a bad step too)."""
        if self.sparse_gradients:
            return _clip_with_sparse(self.params, None)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _skip(self, state: TrainState, why: str) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        self.steps.discard_step()
        self.skips.count(state, why)
        return False


def _refuse_a_step_without_weight(step_fn: StepFunction, weighs_windows: bool) -> None:
    """Before training: a step that gradient accumulation or torchrun must weigh by its
    items has `weight(batch)` (it failed at the first window, mid-run)."""
    if weighs_windows and not callable(getattr(step_fn, "weight", None)):
        raise TypeError(
            f"the step {type(step_fn).__name__} has no weight(batch) method, which gradient "
            "accumulation and torchrun need to weigh each micro-batch by its items: define "
            "it (the items its loss averages over, e.g. len(batch[1]))"
        )


def _check_step_output(step_fn: StepFunction, out: Any) -> None:
    """A step's output is a StepOutput whose loss is a tensor, or a `StepOutputError`
    saying so (exit status 2: it fails the same way until the step changes)."""
    name = type(step_fn).__name__
    if not isinstance(out, StepOutput):
        raise StepOutputError(
            f"the step {name} returned {type(out).__name__}; it must return "
            "StepOutput(loss=..., weight=..., num_samples=...) (traineval.modes.StepOutput)"
        )
    if not isinstance(out.loss, torch.Tensor):
        raise StepOutputError(
            f"the step {name} returned StepOutput(loss={out.loss!r}); the loss must be a "
            "tensor that carries the graph (compute it with torch operations)"
        )


def _check_loss(step_fn: StepFunction, loss: torch.Tensor) -> None:
    """The step's loss is one number that backward can differentiate."""
    name = type(step_fn).__name__
    if loss.ndim != 0:
        raise StepOutputError(
            f"the step {name} returned a loss of shape {tuple(loss.shape)}; the loss must "
            "be a scalar tensor: use a loss with reduction='mean'"
        )
    raise StepOutputError(
        f"the step {name} returned a loss that does not require grad (detached, or "
        "computed under torch.no_grad()): the loss must carry the graph from the model's "
        "trainable parameters"
    )


def _clip_with_sparse(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """`clip_grad_norm_` (or, without `max_norm`, the norm alone) where some gradients are
    sparse (torch's norms take dense ones): a sparse gradient's norm is that of its
    coalesced values, and each gradient is scaled in place as torch's clip does."""
    grads = [p.grad for p in params if p.grad is not None]
    values = [g.coalesce().values() if g.layout == torch.sparse_coo else g for g in grads]
    norm = torch.nn.utils.get_total_norm(values)
    if max_norm is not None:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale)
    return norm


def _step_schedule(scheduler: Any) -> None:
    """Advance the schedule. A schedule planned over a fixed number of updates (onecycle)
    that gets more is said as what happened: the loader yielded more batches than its
    len() (torch's own sentence counts steps)."""
    try:
        scheduler.step()
    except ValueError as error:
        if not str(error).startswith("Tried to step"):
            raise
        raise ValueError(
            f"the learning-rate schedule was planned over fewer updates than the run makes "
            f"({error}): the train loader yields more batches than its len() says (a dataset "
            "that grows, an IterableDataset whose __len__ is low); make len() right, or set "
            "max_steps"
        ) from None
