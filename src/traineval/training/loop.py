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

The loop's parts, each in a module of its own: how a window becomes one update
(`update.WindowUpdate`, the hot path), what the steps leave for the log and the
`train` record (`train_log.TrainLog`), skipping non-finite updates with the buffers put
back (`skips.NonFiniteSkips`), the checkpoints callbacks ask for and when each is written
(`saves.Saves`).

Data-parallel (`job.enabled`): every rank runs this same loop on its share of the data.
Gradients are all-reduced once per window (`no_sync` on the micro-batches before the last),
each micro-batch weighted by its items over the window's items on all ranks, so a window
equals one big batch of everything the ranks saw. Logged and monitored losses are summed
over ranks; a signal seen by any rank stops every rank at the same log step or epoch end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NoReturn

import torch
from torch import nn

from ..callbacks.base import Callback, overrides
from ..data.position import epoch_batches, skip_batches
from ..loggers import LoggerHub
from ..runs.tracking import MetricsTracker, Plateau
from ..runs.train_state import HistoryJson, TrainState, empty_history
from ..system.distributed import Distributed
from ..system.seeding import capture_rng, restore_rng
from .batches import read_once
from .exit_codes import UserCodeError, failure_line
from .monitor import PerformanceMonitor
from .optim import PlateauSchedule
from .saves import CHECKPOINT_SHARE, SaveFn, Saves  # noqa: F401 - CHECKPOINT_SHARE: kept here
from .step_state import StepWatch
from .steplog import NonFiniteError
from .stop_rules import EvaluationError, StopRules
from .stopping import TrainingInterrupted
from .update import Placement, UpdateRule, WindowUpdate

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

_SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # a file name, no path

EvaluateFn = Callable[[nn.Module], dict[str, float]]


class Monitor(Plateau):
    """The metric that drives early stopping, the best checkpoint and the plateau schedule."""

    def __init__(self, name: str, minimize: bool, min_delta: float = 0.0) -> None:
        super().__init__(minimize=minimize, min_delta=min_delta)
        self.name = name

    def read(self, metrics: dict[str, float]) -> float:
        if self.name not in metrics:
            raise KeyError(self.missing_from(metrics))
        return float(metrics[self.name])

    def missing_from(self, metrics: dict[str, float]) -> str:
        """Why `metrics` cannot give the monitored value."""
        known = ", ".join(sorted(k for k in metrics if k.startswith(("val_", "train_"))))
        return f"monitor_metric={self.name!r} is not among the evaluated metrics: {known}"


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
        return self._loop.stops.max_steps

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
        return self._loop.stops.interrupted

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
        self._loop.stops.interrupted = reason

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

    def weights_to_keep(self) -> AbstractContextManager[None]:
        """Inside the block the model holds the weights to keep: their moving average with
        `ema_decay` (e.g. to gather an FSDP model's full weights: `state_to_keep` replaces
        only the entries of a state dict of this rank's shards)."""
        return self._loop.weights_to_keep()


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
        self.job: Distributed = placement.job or Distributed()
        placement = dataclasses.replace(placement, job=self.job)
        self.model = model
        # e.g. the torch.compile'd module (never `or`: a compiled module may define __len__)
        fm = placement.forward_model
        self.forward_model = fm if fm is not None else model
        self.train_loader = train_loader
        self.device = placement.device
        self.monitor = monitor
        self.num_epochs = length.num_epochs
        self.updates_per_epoch = length.updates_per_epoch
        self._longer_said = False  # an epoch longer than len(train_loader), said once
        self._resume_point_kept = False  # max_steps: `last` holds the run before its closing
        self.accumulation_steps = update.accumulation_steps
        self.eval_every_n_steps = length.eval_every_n_steps
        self.log_every_n_steps = length.log_every_n_steps
        self.evaluate_fn = evaluate_fn
        self.save_fn = save_fn
        self.callbacks = list(observe.callbacks)
        loggers = observe.loggers
        self.loggers = loggers if isinstance(loggers, LoggerHub) else LoggerHub(loggers)
        self.tracker = observe.tracker or MetricsTracker()
        self.performance = observe.performance or PerformanceMonitor(self.device)
        self.data_generators = list(data_generators)
        self.state = TrainState()
        self.resume_rng: dict[str, Any] | None = None  # RNG state at the checkpoint
        self.stops = StopRules(self.state, self.job, length.max_steps, length.max_seconds)
        # the histories' entries as JSON, each encoded once (`run_checkpoints.HistoryJson`)
        self.history_json = {"loop": HistoryJson(), "tracker": HistoryJson()}
        self._epoch_complete = False
        self.in_epoch = False  # between on_epoch_start and the epoch's end (its evaluation)
        self._step_callbacks = [c for c in self.callbacks if overrides(c, "on_step_end")]
        self.update = WindowUpdate(
            update, placement, model, length.log_every_n_steps, observe.layer_norms
        )
        self.log, self.steps = self.update.log, self.update.steps
        # what checkpoints and callbacks read of the update
        self.step_fn, self.optimizer = update.step_fn, update.optimizer
        self.step_watch = StepWatch(self.step_fn)  # a user's step state a resume would lose
        self.scheduler, self.weight_average = update.scheduler, update.weight_average
        self.precision = self.update.precision
        self.saves = Saves(save_fn, self.job)
        self.control = LoopControl(self)  # what callbacks see and may ask for

    # -- requests from callbacks and signals --------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary."""
        self.stops.request(reason)

    def request_save(self, name: str, *, deferrable: bool = False) -> None:
        """Save a checkpoint named `name` once the current hook round is over (see
        `LoopControl.request_save` for `deferrable`)."""
        if not isinstance(name, str) or not _SAVE_NAME.fullmatch(name) or name.endswith(".pt"):
            raise ValueError(
                f"request_save(name={name!r}) is invalid: expected a checkpoint name of "
                "letters, digits, '-' and '_' (e.g. 'epoch-0003'; it is saved as "
                "checkpoints/<name>.pt)"
            )
        if name == "best" and self.state.best_step != self.state.global_step:
            raise ValueError(
                "request_save('best') is for the weights of the best evaluation, and the "
                f"monitored {self.monitor.name} did not improve at this step (its best is "
                f"at step {self.state.best_step}): name your checkpoint otherwise"
            )
        within = not deferrable or self.saves.within_budget()
        self.saves.request(name, deferrable=deferrable, within_budget=within)

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
        self.stops.start()
        while not self.stops.done() and (state.batch_in_epoch > 0 or state.epoch < self.num_epochs):
            resuming_inside_epoch = state.batch_in_epoch > 0
            if not resuming_inside_epoch:
                if self.resume_rng is not None:  # resumed at an epoch boundary
                    restore_rng(self.resume_rng, self.data_generators)
                    self.resume_rng = None
                state.epoch += 1
                state.epoch_rng = capture_rng(self.data_generators)
                state.epoch_loss_sum = state.epoch_loss_weight = 0.0
            self.in_epoch = True  # begun, not ended: a run failing in it leaves it out
            self._call("on_epoch_start")
            if self.stops.done():  # asked before the epoch's first batch (a signal, a stop)
                if not resuming_inside_epoch:
                    state.epoch -= 1  # it did not begin: a resume begins it
                    self.in_epoch = False
                break
            train_loss = self._train_epoch(self._batches())
            if not self._closing_without_evaluation():
                self._stop_if_signalled()
            if self.stops.timed_out:
                break
            if not self._epoch_complete:  # max_steps or a stop request, with batches left
                self._close_inside_epoch(train_loss)
                break
            logs = self._end_epoch(train_loss)
            self.in_epoch = False
            self._call("on_epoch_end", logs)
            self._act()
            self._stop_if_signalled()  # one that came during validation, a save, a callback
            if state.epoch < self.num_epochs:
                self.stops.check_time()
        self._stop_if_signalled()
        if self.stops.timed_out:
            self._stop_at_time_limit()
        self.saves.finish()  # a `last` put off within the budget
        self._act()
        self.saves.write_staged()
        state.stopped_early = self.stops.requested
        if self.weight_average is not None:
            self.weight_average.copy_to_model()
        end_logs: dict[str, Any] = {"stop_reason": state.stop_reason}
        self._call("on_train_end", end_logs)
        self._act()
        return state

    def _closing_without_evaluation(self) -> bool:
        """A stop was asked where the run evaluated (early stopping inside an epoch): a
        signal that came meanwhile waits for the close that follows (the partial epoch's
        record, its callbacks and saves: no evaluation, moments), which the uninterrupted
        run makes and a resume of a stopped run would not. Where the close evaluates, a
        signal stops the run first."""
        state = self.state
        at_evaluation = self.evaluate_fn is None or state.last_eval_step == state.global_step
        return self.stops.requested and not self._epoch_complete and at_evaluation

    def _batches(self) -> Iterator[Any]:
        """This epoch's batches: fresh, or after the ones a resumed run already trained on."""
        state = self.state
        set_epoch = getattr(getattr(self.train_loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: this epoch's shuffle
            set_epoch(state.epoch)
        later = state.epoch > 1  # (persistent workers start in a resumed run's later epoch)
        if state.batch_in_epoch == 0:
            return epoch_batches(self.train_loader, later)
        # Regenerate the epoch's shuffle order from its starting RNG, skip by index, then
        # return to the RNG state of the checkpoint once the iterator has drawn its seeds.
        assert state.epoch_rng is not None
        restore_rng(state.epoch_rng, self.data_generators)
        skip = state.batch_in_epoch
        return skip_batches(self.train_loader, skip, self._restore_resume_rng, later)

    def _say_a_longer_epoch(self, batches: int) -> None:
        """Once a run: an epoch of more updates than the loader's len() planned when the run
        began (a dataset that grows): the schedule ends before the run does."""
        planned = self.updates_per_epoch
        updates = -(-batches // self.accumulation_steps)
        if planned is not None and updates > planned and not self._longer_said:
            self._longer_said = True
            logger.warning(
                "this epoch made %d updates, where the train loader's len() planned %d: the "
                "learning-rate schedule and the run's length were planned from len() (a "
                "schedule ends early and its last updates train at its final rate); make "
                "len() right, or set max_steps",
                updates,
                planned,
            )

    def _restore_resume_rng(self) -> None:
        # Only the global generators: the loader's own generators replay the epoch's draws
        # from its starting state, whenever the loader makes them (a loader with workers
        # prefetches, so its end-of-epoch draw may fall before or after the checkpoint).
        if self.resume_rng is not None:
            restore_rng(self.resume_rng, None)
            self.resume_rng = None

    def _train_epoch(self, batches: Iterator[Any]) -> float:
        """Run the epoch's optimizer updates; return the epoch's mean training loss."""
        state = self.state
        self.forward_model.train()
        k = self.accumulation_steps
        interval_steps = interval_samples = 0
        data_seconds = 0.0
        self._epoch_complete = False
        while not self.stops.done():
            fetch_start = time.perf_counter()
            window = list(itertools.islice(batches, k))
            data_seconds += time.perf_counter() - fetch_start
            if not window:
                self._epoch_complete = True
                self._say_a_longer_epoch(state.batch_in_epoch)
                break
            window_start = state.batch_in_epoch
            self.update.skips.before_window()  # a skipped step leaves the buffers as they were
            samples = self.update.accumulate(self.forward_model, window)
            state.batch_in_epoch += len(window)
            logging_next = (state.global_step + 1) % self.log_every_n_steps == 0
            if not self.update.step(state, window_start, logging_next):
                continue
            interval_steps += 1
            interval_samples += samples
            step = state.global_step
            if step % self.log_every_n_steps == 0 or self.steps.full:
                self._read_steps()
            if logged := step % self.log_every_n_steps == 0:
                stats = self.performance.interval(interval_steps, interval_samples, data_seconds)
                interval_steps = interval_samples = 0
                data_seconds = 0.0
                self._log_train(stats)
            self.stops.agree_if_due(logged)
            if self.eval_every_n_steps and step % self.eval_every_n_steps == 0:
                self._evaluate()
                self.forward_model.train()
            for callback in self._step_callbacks:
                callback.on_step_end(self.control)
            if self.saves.requests:
                self._act()
            self.stops.check_time()
        if interval_steps:
            self.performance.interval(interval_steps, interval_samples, data_seconds)
        self._read_steps()
        self.stops.agree()
        loss_sum, weight = self.job.sum([state.epoch_loss_sum, state.epoch_loss_weight])
        if weight == 0 and self._epoch_complete:  # (not a stop before its first batch)
            if state.epoch > 1 and isinstance(self.train_loader, Iterator):
                raise ValueError(
                    f"epoch {state.epoch} trained on no data: the train loader is "
                    f"{read_once(self.train_loader)}, and epoch 1 used it up; pass a list of "
                    "batches, a DataLoader or an IterableDataset, read anew each epoch"
                )
            raise ValueError(
                f"epoch {state.epoch} trained on no data: the train loader yielded no batches, "
                "every target it yielded was ignored (ignore_index), or a step of your own "
                "weighed every batch 0 (its weight(batch))"
            )
        return loss_sum / max(weight, 1e-300)

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
            with (
                self.weights_to_keep(),
                self.stops.in_phase(f"validation at step {state.global_step}"),
            ):
                metrics = self.evaluate_fn(self.forward_model)
        except TrainingInterrupted:
            raise
        except Exception as error:  # it cannot be scored (NaN predictions, a metric's error)
            restore_rng(streams, None)
            self._failed_evaluation(failure_line(error), user_code=isinstance(error, UserCodeError))
        restore_rng(streams, None)
        prefixed = {f"val_{name}": float(value) for name, value in metrics.items()}
        monitored = prefixed.get(self.monitor.name)
        if monitored is not None and not math.isfinite(monitored):
            self._failed_evaluation(f"the monitored metric {self.monitor.name} is {monitored}")
        state.record_evaluation(metrics)
        self.tracker.update(prefixed, state.global_step)
        improved = False
        if self.monitor.name.startswith("val_"):
            if self.monitor.name not in prefixed:  # a mode's own evaluate() names others
                self._failed_evaluation(self.monitor.missing_from(prefixed))
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
            self.state.record_best(value)
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
        state.record_epoch(train_loss, val_loss, lr)
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
        state.finished = self.stops.stopping() or (complete and state.epoch >= self.num_epochs)
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
        extendable = not self.stops.requested
        if extendable:
            state.stop_reason = state.stop_reason or f"max_steps={self.stops.max_steps} reached"
            state.finished = True
            self._save_last()
            self._resume_point_kept = True  # a signal in the evaluation below leaves it
        logs = self._end_epoch(train_loss, complete=False)
        self._call("on_epoch_end", logs)
        if extendable:
            self.saves.forget_last()
        self._act()

    def _log_train(self, stats: dict[str, float]) -> None:
        state = self.state
        lr = float(self.optimizer.param_groups[0]["lr"])
        record = self.log.record(state, stats, lr, self.update.max_grad_norm)
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
        with self.stops.in_phase(f"the {hook} callbacks"):
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
        with self.stops.in_phase("a checkpoint write"):
            self.saves.carry_out(requests, staging, self)

    def _save_last(self) -> Any:
        """Write `last` at this point (the resume point), unless it already holds it."""
        if self.save_fn is None:
            return None
        held = self.saves.holding_last(self.position())
        if held is not None:
            return held
        if self._resume_point_kept:  # the closing evaluation after it is not a resume point
            return self.saves.last[0] if self.saves.last is not None else None
        self._read_steps()
        with self.stops.in_phase("a checkpoint write"):
            self.saves.write_staged()
            return self.saves.save("last", self, self.position())

    @property
    def closing_after_resume_point(self) -> bool:
        """Whether the run is past its resume point: the closing evaluation of a max_steps
        stop, which an uninterrupted longer run never makes (its `best` is kept apart)."""
        return self._resume_point_kept

    def position(self) -> tuple[int, ...]:
        """Where the run is: a checkpoint written at an equal position holds the same state."""
        s = self.state
        return (s.epoch, s.batch_in_epoch, s.global_step, len(s.history["val_steps"]),
                len(s.history["epoch"]), s.skipped_steps)  # fmt: skip

    def _stop_if_signalled(self) -> None:
        if self.stops.signal():
            self._save_interrupted()

    def _failed_evaluation(self, reason: str, user_code: bool = False) -> NoReturn:
        """A validation that cannot be scored: save the training done so far as a resumable
        `last` checkpoint (from before this evaluation), then stop naming where and why. A
        model whose weights are not finite is not saved (the earlier checkpoints stay).
        `user_code`: a metric of the user's raised (see `EvaluationError`)."""
        try:
            path = self._save_last()
        except NonFiniteError as refused:
            raise self.stops.failed_evaluation(reason, None, refused, user_code) from None
        raise self.stops.failed_evaluation(reason, str(path) if path else None, None, user_code)

    def _stop_at_time_limit(self) -> None:
        """max_seconds is up at this step boundary: write the saves asked for, then `last`
        as the run stands (a resume continues it as an uninterrupted run would: no closing
        evaluation is made), and end with the reason."""
        self._act()
        path = self._save_last()
        self.saves.forget_last()
        self.state.timed_out = True
        self.state.stop_reason = self.stops.time_limit_reason(str(path) if path else None)

    def _save_interrupted(self) -> NoReturn:
        """Save a resumable `last` checkpoint at this step boundary and stop."""
        path = self._save_last()
        raise self.stops.interruption(str(path) if path else None)
