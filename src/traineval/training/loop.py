"""The fit loop: plain objects in, no config reads.

Pseudocode of `Loop.run`:

    for epoch in epochs (a resumed run starts inside its epoch, skipping seen batches):
        for window in accumulation windows of the train loader (the last may be short):
            for micro-batch in window:
                loss = step(model, batch) under autocast
                backward(loss * weight(batch) / weight(window))   # == one big batch
            unscale (fp16) -> clip the window's gradient -> optimizer.step -> scheduler.step
            -> fold the weights into their moving average (`weight_average`, if any)
            record the step's loss on the device (no sync)
            every log_every updates: read the recorded losses (the only sync), log
            every eval_every updates: evaluate (the averaged weights, if any; the random
                streams are put back after), update the monitor, callbacks
            on_step_end callbacks; act on their save requests; stop if asked or signalled
        evaluate at epoch end; callbacks; act on their stop / save requests
    the model takes the averaged weights (if any); on_train_end callbacks

Before any checkpoint is written the recorded losses are read, so a non-finite loss or
gradient stops the run (`NonFiniteError`, naming epoch, step and batch) before it is saved.

The loop's parts, each in a module of its own: what the steps leave for the log and the
`train` record (`train_log.TrainLog`), skipping non-finite updates with the buffers put
back (`skips.NonFiniteSkips`), the checkpoints callbacks ask for and when each is written
(`saves.Saves`), a window's loss shares (`steps.window_share`).

Data-parallel (`job.enabled`): every rank runs this same loop on its share of the data.
Gradients are all-reduced once per window (`no_sync` on the micro-batches before the last),
each micro-batch weighted by its items over the window's items on all ranks, so a window
equals one big batch of everything the ranks saw. Logged and monitored losses are summed
over ranks; a signal seen by any rank stops every rank at the same log step or epoch end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NoReturn

import torch
from torch import nn

from ..callbacks.base import Callback, overrides
from ..data.position import skip_batches
from ..loggers import LoggerHub
from ..runs.tracking import MetricsTracker, Plateau
from ..runs.train_state import HistoryJson, TrainState, empty_history
from ..system.distributed import Distributed
from ..system.seeding import capture_rng, restore_rng
from .averaging import WeightAverage
from .batches import move_to_device
from .monitor import PerformanceMonitor
from .optim import PlateauSchedule
from .precision import Precision
from .saves import CHECKPOINT_SHARE, SaveFn, Saves  # noqa: F401 - CHECKPOINT_SHARE: kept here
from .skips import NonFiniteSkips
from .steplog import NonFiniteError, StepLog
from .steps import StepFunction, window_share
from .stopping import TrainingInterrupted
from .train_log import TrainLog

__all__ = [
    "EvaluateFn",
    "EvaluationError",
    "Loop",
    "LoopControl",
    "Monitor",
    "Observers",
    "Placement",
    "RunLength",
    "TrainState",
    "TrainingInterrupted",
    "UpdateRule",
    "empty_history",
]

logger = logging.getLogger("traineval")

EvaluateFn = Callable[[nn.Module], dict[str, float]]


class EvaluationError(ValueError):
    """A validation could not be scored (e.g. the model predicted NaN); the training before
    it was saved as a resumable checkpoint."""


class Monitor(Plateau):
    """The metric that drives early stopping, the best checkpoint and the plateau schedule."""

    def __init__(self, name: str, minimize: bool, min_delta: float = 0.0) -> None:
        super().__init__(minimize=minimize, min_delta=min_delta)
        self.name = name

    def read(self, metrics: dict[str, float]) -> float:
        if self.name not in metrics:
            known = ", ".join(sorted(k for k in metrics if k.startswith(("val_", "train_"))))
            raise KeyError(
                f"monitor_metric={self.name!r} is not among the evaluated metrics: {known}"
            )
        return float(metrics[self.name])


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
class RunLength:
    """How long the loop runs, and how often it evaluates and logs (in optimizer updates)."""

    num_epochs: int
    updates_per_epoch: int | None = None  # None: the loader has no len()
    max_steps: int | None = None
    eval_every_n_steps: int | None = None  # besides each epoch's end
    log_every_n_steps: int = 100
    max_seconds: float | None = None  # this process's training time (a resume continues)


@dataclasses.dataclass
class Placement:
    """Where the loop runs: the device, the module the steps call, the data-parallel job."""

    device: torch.device
    forward_model: nn.Module | None = None  # e.g. the torch.compile'd or DDP module
    job: Distributed | None = None
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None  # DDP's
    average_gradients: bool = False  # the loop all-reduces (modes without a DDP wrapper)


@dataclasses.dataclass
class Observers:
    """Who watches: callbacks (which may request), loggers, trackers."""

    callbacks: Sequence[Callback] = ()
    loggers: Sequence[Any] | LoggerHub = ()
    tracker: MetricsTracker | None = None
    performance: PerformanceMonitor | None = None
    layer_norms: bool = False  # log each parameter tensor's gradient norm


class LoopControl:
    """What a callback sees and may ask for (its hooks' first argument): the counters, the
    model, the monitor, read-only views of the optimizer, schedule and scaler, and requests
    the loop carries out at the next step boundary."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop

    @property
    def state(self) -> TrainState:
        """The counters and history (`global_step`, `epoch`, `best_metric`, ...)."""
        return self._loop.state

    @property
    def model(self) -> nn.Module:
        """The module being trained (unwrapped)."""
        return self._loop.model

    @property
    def monitor(self) -> Monitor:
        """The monitored metric: `name`, `best`, `num_bad` evaluations without improvement."""
        return self._loop.monitor

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """Observe (e.g. its `param_groups`' rates); the loop steps it."""
        return self._loop.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        return self._loop.scheduler

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's gradient scaler (None in other precisions)."""
        return self._loop.precision.scaler

    @property
    def num_epochs(self) -> int:
        return self._loop.num_epochs

    @property
    def updates_per_epoch(self) -> int | None:
        return self._loop.updates_per_epoch

    @property
    def max_steps(self) -> int | None:
        return self._loop.max_steps

    @property
    def rank(self) -> int:
        """This process's rank under torchrun (0 alone)."""
        return self._loop.job.rank

    @property
    def is_main(self) -> bool:
        return self._loop.job.is_main

    @property
    def interrupted(self) -> str | None:
        """The signal the run was interrupted by, if any."""
        return self._loop.interrupted

    @interrupted.setter
    def interrupted(self, reason: str) -> None:
        _surface_warning("loop.interrupted = ...", "loop.request_interrupt(reason)")
        self.request_interrupt(reason)

    def __getattr__(self, name: str) -> Any:
        # Callbacks of earlier versions got the Loop itself: its other attributes still
        # answer, with a warning naming the surface to use instead.
        if name.startswith("__") or name == "_loop":
            raise AttributeError(name)
        value = getattr(self._loop, name)
        _surface_warning(
            f"loop.{name}", "the callback surface (traineval.training.loop.LoopControl)"
        )
        return value

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary (early stopping)."""
        self._loop.request_stop(reason)

    def request_save(self, name: str, *, deferrable: bool = False) -> None:
        """Save a checkpoint named `name` once the current hook round is over. `deferrable`:
        the loop may put it off while checkpoints would take more than CHECKPOINT_SHARE of
        the run's time (many tiny epochs); a put-off save is made before the run ends."""
        self._loop.request_save(name, deferrable=deferrable)

    def request_interrupt(self, reason: str = "SIGTERM") -> None:
        """Stop as on a signal: save a resumable `last` checkpoint, then raise
        `TrainingInterrupted` (e.g. before a cluster's time limit)."""
        self._loop.interrupted = reason

    def set_learning_rate(self, rate: float) -> None:
        """Train the next updates at `rate` (the first parameter group's; the others keep
        their ratios to it, e.g. lr_multipliers)."""
        groups = self._loop.optimizer.param_groups
        base = groups[0]["lr"]
        for group in groups:
            group["lr"] = rate * (group["lr"] / base if base else 1.0)

    def state_to_keep(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` (a state dict of the model) as the weights to keep: their moving
        average with `ema_decay`."""
        return self._loop.state_to_keep(state)


def _surface_warning(used: str, instead: str) -> None:
    warnings.warn(
        f"{used} in a callback reaches into the loop's internals; use {instead} (callbacks "
        "get a LoopControl since traineval 0.2: state, model, monitor, optimizer, scheduler, "
        "scaler, requests)",
        FutureWarning,
        stacklevel=3,
    )


class Loop:
    """One training run over plain objects; see the module docstring for the order of work."""

    def __init__(
        self,
        *,
        model: nn.Module,
        train_loader: Iterable[Any],
        update: UpdateRule,
        length: RunLength,
        placement: Placement,
        monitor: Monitor,
        evaluate_fn: EvaluateFn | None = None,
        save_fn: SaveFn | None = None,
        observers: Observers | None = None,
        data_generators: Sequence[torch.Generator] = (),
    ) -> None:
        observe = observers or Observers()
        device = placement.device
        self.model = model
        # e.g. the torch.compile'd module (never `or`: a compiled module may define __len__)
        fm = placement.forward_model
        self.forward_model = fm if fm is not None else model
        self.optimizer = update.optimizer
        self.scheduler = update.scheduler
        self.step_fn = update.step_fn
        self.train_loader = train_loader
        self.device = device
        self.precision = update.precision or Precision("fp32", device.type, None)
        self.monitor = monitor
        self.num_epochs = length.num_epochs
        self.updates_per_epoch = length.updates_per_epoch
        self.accumulation_steps = update.accumulation_steps
        self.max_grad_norm = update.max_grad_norm
        self.max_steps = length.max_steps
        self.max_seconds = length.max_seconds
        self._deadline: float | None = None  # time.monotonic() at which max_seconds is up
        self._timed_out = False  # (agreed over the ranks, as signals are)
        self.eval_every_n_steps = length.eval_every_n_steps
        self.log_every_n_steps = length.log_every_n_steps
        self.evaluate_fn = evaluate_fn
        self.save_fn = save_fn
        self.callbacks = list(observe.callbacks)
        loggers = observe.loggers
        self.loggers = loggers if isinstance(loggers, LoggerHub) else LoggerHub(loggers)
        self.tracker = observe.tracker or MetricsTracker()
        self.performance = observe.performance or PerformanceMonitor(device)
        self.data_generators = list(data_generators)
        self.skips = NonFiniteSkips(model, update.skip_non_finite)
        self.state = TrainState()
        self.resume_rng: dict[str, Any] | None = None  # RNG state at the checkpoint
        self.interrupted: str | None = None  # set by a signal handler
        self.interrupted_during: str | None = None  # the phase the signal arrived in
        self.phase = "training"
        # the histories' entries as JSON, each encoded once (`run_checkpoints.HistoryJson`)
        self.history_json = {"loop": HistoryJson(), "tracker": HistoryJson()}
        self._epoch_complete = False
        self._step_callbacks = [c for c in self.callbacks if overrides(c, "on_step_end")]
        self._stop_requested = False
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        names = {id(p): name for name, p in model.named_parameters()}
        named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(self._params)]
        self.steps = StepLog(device, capacity=min(self.log_every_n_steps, 4096))
        scaler = self.precision.scaler
        self._scale = scaler.get_scale() if scaler is not None else None
        self.job = placement.job or Distributed()
        self.saves = Saves(save_fn, self.job)
        self.log = TrainLog(self.steps, named, self.job, observe.layer_norms)
        self.no_sync = placement.no_sync  # DDP's: skip the gradient all-reduce inside a window
        # Modes without a DDP wrapper: average the window's gradients over the ranks here.
        self.average_gradients = placement.average_gradients
        self._agreed_signal: str | None = None  # a signal every rank has agreed to stop on
        # EMA of the weights: updated after each update, evaluated, kept when training ends
        self.weight_average = update.weight_average
        self.control = LoopControl(self)  # what callbacks see and may ask for

    # -- requests from callbacks and signals --------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary."""
        self._stop_requested = True
        self.state.stop_reason = reason

    def request_save(self, name: str, *, deferrable: bool = False) -> None:
        """Save a checkpoint named `name` once the current hook round is over (see
        `LoopControl.request_save` for `deferrable`)."""
        within = not deferrable or self._writes_within_budget()
        self.saves.request(name, deferrable=deferrable, within_budget=within)

    def _writes_within_budget(self) -> bool:
        """Whether another write now keeps checkpoints within the budget (`saves`)."""
        return self.saves.within_budget()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainState:
        """Train to the end; on an exception (a signal, a failed evaluation, an error in the
        step) the callbacks' on_exception hooks run before it propagates."""
        try:
            return self._run()
        except BaseException as error:
            self._call_on_exception(error)
            raise

    def _run(self) -> TrainState:
        state = self.state
        self._call("on_train_start")
        self.performance.start()
        if self.max_seconds is not None:
            self._deadline = time.monotonic() + self.max_seconds
        while not self._done() and (state.batch_in_epoch > 0 or state.epoch < self.num_epochs):
            resuming_inside_epoch = state.batch_in_epoch > 0
            if not resuming_inside_epoch:
                if self.resume_rng is not None:  # resumed at an epoch boundary
                    restore_rng(self.resume_rng, self.data_generators)
                    self.resume_rng = None
                state.epoch += 1
                state.epoch_rng = capture_rng(self.data_generators)
                state.epoch_loss_sum = state.epoch_loss_weight = 0.0
            self._call("on_epoch_start")
            train_loss = self._train_epoch(self._batches())
            self._stop_if_signalled()
            if self._timed_out:
                break
            if not self._epoch_complete:  # max_steps or a stop request, with batches left
                self._close_inside_epoch(train_loss)
                break
            logs = self._end_epoch(train_loss)
            self._call("on_epoch_end", logs)
            self._act()
            self._stop_if_signalled()  # one that came during validation, a save, a callback
            if state.epoch < self.num_epochs:
                self._check_time()
        self._stop_if_signalled()
        if self._timed_out:
            self._stop_at_time_limit()
        self.saves.finish()  # a `last` put off within the budget
        self._act()
        self.saves.write_staged()
        state.stopped_early = self._stop_requested
        if self.weight_average is not None:
            self.weight_average.copy_to_model()
        end_logs: dict[str, Any] = {"stop_reason": state.stop_reason}
        self._call("on_train_end", end_logs)
        self._act()
        return state

    def _batches(self) -> Iterator[Any]:
        """This epoch's batches: fresh, or after the ones a resumed run already trained on."""
        state = self.state
        set_epoch = getattr(getattr(self.train_loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: this epoch's shuffle
            set_epoch(state.epoch)
        if state.batch_in_epoch == 0:
            return iter(self.train_loader)
        # Regenerate the epoch's shuffle order from its starting RNG, skip by index, then
        # return to the RNG state of the checkpoint once the iterator has drawn its seeds.
        assert state.epoch_rng is not None
        restore_rng(state.epoch_rng, self.data_generators)
        return skip_batches(self.train_loader, state.batch_in_epoch, self._restore_resume_rng)

    def _restore_resume_rng(self) -> None:
        # Only the global generators: the loader's own generators replay the epoch's draws
        # from its starting state, whenever the loader makes them (a loader with workers
        # prefetches, so its end-of-epoch draw may fall before or after the checkpoint).
        if self.resume_rng is not None:
            restore_rng(self.resume_rng, None)
            self.resume_rng = None

    def _done(self) -> bool:
        """Whether to stop at this step boundary: a stop request, max_steps, max_seconds or
        a signal."""
        return self._stopping() or self._signal() is not None or self._timed_out

    def _check_time(self) -> None:
        """Whether max_seconds is up, alone: after each update and each epoch's end with
        epochs left (never before an epoch's first update: a resume would skip it); under
        torchrun where the ranks agree on signals (log steps, epoch ends)."""
        if self._deadline is None or self._timed_out or self.job.enabled or self._stopping():
            return
        self._timed_out = time.monotonic() >= self._deadline

    def _stopping(self) -> bool:
        """Whether the run ends before its epochs do: a stop request or max_steps (a
        signal interrupts it instead)."""
        at_max = self.max_steps is not None and self.state.global_step >= self.max_steps
        return self._stop_requested or at_max

    def _signal(self) -> str | None:
        """The signal to stop on: at once alone, once every rank agrees when distributed."""
        return self._agreed_signal if self.job.enabled else self.interrupted

    def _agree_on_signal(self) -> None:
        """Distributed: stop together if any rank was signalled or is out of time (at log
        steps, epoch ends)."""
        signalled = self.job.enabled and self._agreed_signal is None
        if signalled and self.job.any(self.interrupted is not None):
            self._agreed_signal = self.interrupted or "SIGTERM"
        deadline = self._deadline
        timing = self.job.enabled and deadline is not None and not self._timed_out
        if timing and not self._stopping():  # the same on every rank: they all take part
            self._timed_out = self.job.any(time.monotonic() >= deadline)  # type: ignore[operator]

    def _train_epoch(self, batches: Iterator[Any]) -> float:
        """Run the epoch's optimizer updates; return the epoch's mean training loss."""
        state = self.state
        self.forward_model.train()
        k = self.accumulation_steps
        interval_steps = interval_samples = 0
        data_seconds = 0.0
        self._epoch_complete = False
        while not self._done():
            fetch_start = time.perf_counter()
            window = list(itertools.islice(batches, k))
            data_seconds += time.perf_counter() - fetch_start
            if not window:
                self._epoch_complete = True
                break
            window_start = state.batch_in_epoch
            self.skips.before_window()  # a skipped step leaves the buffers as they were
            samples = self._accumulate(window)
            state.batch_in_epoch += len(window)
            if not self._optimizer_step(window_start):
                continue
            interval_steps += 1
            interval_samples += samples
            step = state.global_step
            if step % self.log_every_n_steps == 0 or self.steps.full:
                self._read_steps()
            if step % self.log_every_n_steps == 0:
                stats = self.performance.interval(interval_steps, interval_samples, data_seconds)
                interval_steps = interval_samples = 0
                data_seconds = 0.0
                self._log_train(stats)
                self._agree_on_signal()
            if self.eval_every_n_steps and step % self.eval_every_n_steps == 0:
                self._evaluate()
                self.forward_model.train()
            for callback in self._step_callbacks:
                callback.on_step_end(self.control)
            if self.saves.requests:
                self._act()
            self._check_time()
        if interval_steps:
            self.performance.interval(interval_steps, interval_samples, data_seconds)
        self._read_steps()
        self._agree_on_signal()
        loss_sum, weight = self.job.sum([state.epoch_loss_sum, state.epoch_loss_weight])
        if weight == 0 and not self._signal() and not self._timed_out:
            raise ValueError(
                f"epoch {state.epoch} trained on no data: the train loader yielded no batches"
            )
        return loss_sum / max(weight, 1e-300)

    def _accumulate(self, window: list[Any]) -> int:
        """Forward and backward over one window; gradients equal those of one big batch."""
        if self.device.type != "cpu":
            window = [move_to_device(batch, self.device) for batch in window]
        shares: list[int | float | torch.Tensor] = []
        if len(window) > 1 or self.job.enabled:
            # Normalise by the whole window's item count, known before any forward pass.
            weights = [self.step_fn.weight(batch) for batch in window]
            total = sum(weights[1:], start=weights[0])
            if self.job.enabled:
                # DDP averages gradients over ranks: weigh by this rank's share of all items.
                total = self.job.sum_tensor(total) / self.job.world_size
            if isinstance(total, torch.Tensor) and total.ndim == 1:
                total = total.clamp(min=1e-12)  # per-term counts: a term no item has is 0
            shares = [weight / total for weight in weights]
        scaler = self.precision.scaler
        samples = 0
        last = len(window) - 1
        for i, batch in enumerate(window):
            # DDP all-reduces gradients in the window's last backward pass only.
            skip_sync = self.no_sync is not None and i < last
            with self.no_sync() if skip_sync else nullcontext():  # type: ignore[misc]
                with self.precision.autocast():
                    out = self.step_fn(self.forward_model, batch)
                loss = out.loss
                if loss.ndim != 0:
                    raise ValueError(
                        f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}; "
                        "use a loss with reduction='mean'"
                    )
                scaled = window_share(out, shares[i]) if shares else loss
                self.log.add(loss, out.weight, out.metrics)
                samples += out.num_samples
                del out  # its outputs (a language model's logits: GBs) die before backward
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return samples

    def _optimizer_step(self, window_start: int) -> bool:
        """Unscale (fp16), clip the window's gradient, step, advance the schedule.

        Returns whether an update happened: an fp16 step the GradScaler skipped (inf/NaN
        gradients), or a non-finite step under the skip policy, is not an update.
        """
        state = self.state
        scaler = self.precision.scaler
        if self.average_gradients:
            self.job.average_gradients(self._params)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        norm = None
        logging_next = (state.global_step + 1) % self.log_every_n_steps == 0
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        elif logging_next:  # no clipping: measure the norm on log steps only
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self._params if p.grad is not None]
            )
        if norm is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # FSDP: a replicated DTensor
        if logging_next:
            self.log.measure_layers()
        if self.skips.limit and not self.skips.finite(self.steps.open_losses(), norm):
            self.skips.undo(self.precision.scaler)
            return self._skip("non-finite loss or gradient")
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
            scale = scaler.get_scale()  # a sync, only with fp16: was the step skipped?
            skipped = self._scale is not None and scale < self._scale
            self._scale = scale
            if skipped:
                return self._skip("fp16 overflow, the GradScaler lowered its scale")
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.weight_average is not None:
            self.weight_average.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.consecutive_non_finite = 0
        self.steps.close_step(state.global_step, state.epoch, window_start, norm)
        return True

    def _skip(self, why: str) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        self.steps.discard_step()
        self.skips.count(self.state, why)
        return False

    def _read_steps(self) -> None:
        """Read the recorded steps back into the state; stop on the first non-finite one."""
        self.log.read(self.state)

    # -- evaluation, logging, requests --------------------------------------------------------

    def weights_to_keep(self) -> AbstractContextManager[None]:
        """Inside the block the model holds the weights training produces for use: the
        moving average when there is one (`ema_decay`), else the trained weights."""
        if self.weight_average is None:
            return nullcontext()
        return self.weight_average.applied()

    def state_to_keep(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` (the model's state dict) as the weights to keep (see `weights_to_keep`)."""
        if self.weight_average is None:
            return state
        return self.weight_average.averaged_state(state)

    def _evaluate(self) -> dict[str, Any] | None:
        if self.evaluate_fn is None:
            return None
        state = self.state
        # Evaluation leaves the training's random streams as it found them (iterating a
        # DataLoader draws a seed from torch's generator even without shuffling): the same
        # seed trains the same with or without validation, at any eval_frequency.
        streams = capture_rng()
        try:
            with self.weights_to_keep(), self._in_phase(f"validation at step {state.global_step}"):
                metrics = self.evaluate_fn(self.forward_model)
        except ValueError as error:  # the metrics cannot be computed (NaN predictions, ...)
            restore_rng(streams, None)
            self._failed_evaluation(str(error))
        restore_rng(streams, None)
        prefixed = {f"val_{name}": float(value) for name, value in metrics.items()}
        monitored = prefixed.get(self.monitor.name)
        if monitored is not None and not math.isfinite(monitored):
            self._failed_evaluation(f"the monitored metric {self.monitor.name} is {monitored}")
        state.last_eval_step = state.global_step
        state.history["val_metrics"].append(dict(metrics))
        state.history["val_steps"].append(state.global_step)
        self.tracker.update(prefixed, state.global_step)
        improved = False
        if self.monitor.name.startswith("val_"):
            value = self.monitor.read(prefixed)
            improved = self._observe(value)
            if isinstance(self.scheduler, PlateauSchedule):
                self.scheduler.step_on_metric(value)
        record = {
            "split": "val",
            **prefixed,
        }
        self._emit("eval", record)
        logs = {**prefixed, "improved": improved}
        self._call("on_evaluate", logs)
        self._act()
        return logs

    def _observe(self, value: float) -> bool:
        improved = self.monitor.update(value)
        if improved:
            self.state.best_metric = value
            self.state.best_epoch = self.state.epoch
            self.state.best_step = self.state.global_step
        return improved

    def _end_epoch(self, train_loss: float, complete: bool = True) -> dict[str, Any]:
        """Evaluate (unless this update just did), record the epoch; `complete`: its batches
        are all trained on (else the position stays, for a resume inside it)."""
        state = self.state
        eval_logs = None
        if state.last_eval_step != state.global_step:
            eval_logs = self._evaluate()
            self.forward_model.train()
        elif state.history["val_metrics"]:
            eval_logs = {f"val_{k}": v for k, v in state.history["val_metrics"][-1].items()}
        lr = float(self.optimizer.param_groups[0]["lr"])
        val_loss = eval_logs.get("val_loss") if eval_logs else None
        state.history["epoch"].append(state.epoch)
        state.history["train_loss"].append(train_loss)
        state.history["val_loss"].append(val_loss)
        state.history["learning_rate"].append(lr)
        self.tracker.update({"train_loss": train_loss}, state.global_step)
        logs: dict[str, Any] = {"train_loss": train_loss, "learning_rate": lr}
        if eval_logs:
            logs.update({k: v for k, v in eval_logs.items() if k != "improved"})
        logs["improved"] = False
        if self.monitor.name == "train_loss":
            logs["improved"] = self._observe(train_loss)
            if isinstance(self.scheduler, PlateauSchedule):
                self.scheduler.step_on_metric(train_loss)
        if complete:
            state.batch_in_epoch = 0
        state.finished = self._stopping() or (complete and state.epoch >= self.num_epochs)
        self._emit("epoch", {"train_loss": train_loss, "learning_rate": lr})
        logs["epoch_complete"] = complete
        return logs

    def _close_inside_epoch(self, train_loss: float) -> None:
        """The run ends with batches of this epoch left (max_steps, a stop request); the
        position stays where it is. At max_steps a longer run may continue from here: the
        resume point is saved first, since the closing evaluation below is one an
        uninterrupted longer run would not make (it must not reach the resumed monitor,
        schedule or early stopping). Then evaluate and report the partial epoch."""
        state = self.state
        extendable = not self._stop_requested
        if extendable:
            state.stop_reason = state.stop_reason or f"max_steps={self.max_steps} reached"
            state.finished = True
            self._save_last()
        logs = self._end_epoch(train_loss, complete=False)
        self._call("on_epoch_end", logs)
        if extendable:
            self.saves.forget_last()
        self._act()

    def _log_train(self, stats: dict[str, float]) -> None:
        state = self.state
        lr = float(self.optimizer.param_groups[0]["lr"])
        record = self.log.record(state, stats, lr, self.max_grad_norm)
        self.tracker.update(
            {"train_step_loss": record["train_step_loss"], "learning_rate": lr}, state.global_step
        )
        self._emit("train", record)
        self._call("on_log", record)

    def _emit(self, event: str, values: dict[str, Any]) -> None:
        self.loggers.log(
            {"event": event, "epoch": self.state.epoch, **values}, self.state.global_step
        )

    def _call(self, hook: str, *args: Any) -> None:
        with self._in_phase(f"the {hook} callbacks"):
            for callback in self.callbacks:
                getattr(callback, hook)(self.control, *args)

    def _call_on_exception(self, error: BaseException) -> None:
        """Let each callback release what it holds; their own errors are logged, so the
        original exception is the one the caller sees."""
        for callback in self.callbacks:
            try:
                callback.on_exception(self.control, error)
            except Exception:  # the training error is the one to report
                logger.exception("%s.on_exception failed", type(callback).__name__)

    def _act(self) -> None:
        """Carry out the saves the callbacks asked for, once every recorded step is finite
        (see `Saves.carry_out`)."""
        requests, staging = self.saves.take()
        if not (requests or staging):
            return
        self._read_steps()
        with self._in_phase("a checkpoint write"):
            self.saves.carry_out(requests, staging, self)

    def _save_last(self) -> Any:
        """Write `last` at this point (the resume point), unless it already holds it."""
        if self.save_fn is None:
            return None
        held = self.saves.holding_last(self.position())
        if held is not None:
            return held
        self._read_steps()
        with self._in_phase("a checkpoint write"):
            self.saves.write_staged()
            return self.saves.save("last", self, self.position())

    def position(self) -> tuple[int, ...]:
        """Where the run is: a checkpoint written at an equal position holds the same state."""
        s = self.state
        return (s.epoch, s.batch_in_epoch, s.global_step, len(s.history["val_steps"]),
                len(s.history["epoch"]), s.skipped_steps)  # fmt: skip

    @contextlib.contextmanager
    def _in_phase(self, phase: str) -> Iterator[None]:
        """Name what the loop is doing, for the message of a signal that arrives meanwhile."""
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def signalled(self, name: str) -> None:
        """A signal arrived (the signal watch calls this): stop at the next consistent point."""
        if self.interrupted is None:
            self.interrupted, self.interrupted_during = name, self.phase

    def _stop_if_signalled(self) -> None:
        if self._signal():
            self._save_interrupted()

    def _failed_evaluation(self, reason: str) -> NoReturn:
        """A validation that cannot be scored: save the training done so far as a resumable
        `last` checkpoint (from before this evaluation), then stop naming where and why. A
        model whose weights are not finite is not saved (the earlier checkpoints stay)."""
        where = f"validation at epoch {self.state.epoch}, step {self.state.global_step} failed"
        try:
            path = self._save_last()
        except NonFiniteError as refused:
            raise EvaluationError(
                f"{where}: {reason}; {refused}: resuming from it would come back here; lower "
                "learning_rate, clip gradients (max_grad_norm) or check the data"
            ) from None
        saved = (
            f"the training so far is saved in {str(path)!r}; a resume (resume_from='auto', or "
            "--resume auto) redoes this validation, which fails again unless what made it "
            "fail changes"
            if path
            else "no checkpoint was written"
        )
        raise EvaluationError(f"{where}: {reason}; {saved}")

    def _stop_at_time_limit(self) -> None:
        """max_seconds is up at this step boundary: write the saves asked for, then `last`
        as the run stands (a resume continues it as an uninterrupted run would: no closing
        evaluation is made), and end with the reason."""
        self._act()
        path = self._save_last()
        self.saves.forget_last()
        state = self.state
        state.timed_out = True
        where = f"epoch {state.epoch}, step {state.global_step}"
        how = f"resume from {str(path)!r} to continue" if path else "no checkpoint was written"
        state.stop_reason = f"max_time={self.max_seconds:g}s reached at {where}; {how}"

    def _save_interrupted(self) -> None:
        """Save a resumable `last` checkpoint at this step boundary and stop."""
        signal_name = self._signal() or "signal"
        path = self._save_last()
        during = f" during {self.interrupted_during}" if self.interrupted_during else ""
        where = f"epoch {self.state.epoch}, step {self.state.global_step}{during}"
        how = (
            f"resume with resume_from={str(path)!r} (or 'auto')"
            if path
            else "no checkpoint was written"
        )
        what = f"training interrupted by {signal_name} at {where}"
        raise TrainingInterrupted(f"{what}; {how}", str(path) if path else None, signal_name, what)
