"""The fit loop: plain objects in, no config reads.

Pseudocode of `Loop.run`:

    for epoch in epochs:
        for window in accumulation windows of the train loader (the last may be short):
            for micro-batch in window:
                loss = step(model, batch) under autocast
                backward(loss * weight(batch) / weight(window))   # == one big batch
            unscale (fp16) -> clip the window's gradient -> optimizer.step -> scheduler.step
            every log_every updates: read the running loss (the only sync), log
            every eval_every updates: evaluate, update the monitor, callbacks
        evaluate at epoch end; callbacks; act on their stop / save requests
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .callbacks.base import Callback, overrides
from .modes.base import StepFunction, move_to_device
from .monitor import PerformanceMonitor
from .optim import PlateauSchedule
from .precision import Precision
from .tracking import MetricsTracker, Plateau

EvaluateFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[str, "Loop"], Any]


@dataclasses.dataclass
class TrainState:
    """Counters of a run. Epochs are numbered from 1; `global_step` counts optimizer updates."""

    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    stop_reason: str | None = None
    stopped_early: bool = False
    last_eval_step: int | None = None
    history: dict[str, list[Any]] = dataclasses.field(
        default_factory=lambda: {
            "epoch": [],
            "train_loss": [],
            "val_loss": [],
            "learning_rate": [],
            "val_metrics": [],
            "val_steps": [],
        }
    )


class RunningLoss:
    """Item-weighted sum of losses, kept on the device so adding never waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0  # item counts known on the host (samples)
        self.device_count: torch.Tensor | None = None  # counts known on the device (tokens)

    def add(self, loss: torch.Tensor, weight: int | torch.Tensor) -> None:
        if isinstance(weight, int):
            self.loss_sum.add_(loss, alpha=weight)
            self.count += weight
        else:
            self.loss_sum.add_(loss * weight)
            self.device_count = weight if self.device_count is None else self.device_count + weight

    def read(self) -> tuple[float, float]:
        """`(sum of item losses, item count)`; waits for the device."""
        count = float(self.count)
        if self.device_count is not None:
            count += self.device_count.item()
        return self.loss_sum.item(), count


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


class Loop:
    """One training run over plain objects; see the module docstring for the order of work."""

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        step_fn: StepFunction,
        train_loader: Iterable[Any],
        device: torch.device,
        precision: Precision,
        monitor: Monitor,
        num_epochs: int,
        updates_per_epoch: int | None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        max_steps: int | None = None,
        eval_every_n_steps: int | None = None,
        log_every_n_steps: int = 100,
        evaluate_fn: EvaluateFn | None = None,
        save_fn: SaveFn | None = None,
        callbacks: Sequence[Callback] = (),
        loggers: Sequence[Any] = (),
        tracker: MetricsTracker | None = None,
        performance: PerformanceMonitor | None = None,
        forward_model: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.forward_model = forward_model or model  # e.g. the torch.compile'd module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_fn = step_fn
        self.train_loader = train_loader
        self.device = device
        self.precision = precision
        self.monitor = monitor
        self.num_epochs = num_epochs
        self.updates_per_epoch = updates_per_epoch
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.max_steps = max_steps
        self.eval_every_n_steps = eval_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.evaluate_fn = evaluate_fn
        self.save_fn = save_fn
        self.callbacks = list(callbacks)
        self.loggers = list(loggers)
        self.tracker = tracker or MetricsTracker()
        self.performance = performance or PerformanceMonitor(device)
        self.state = TrainState()
        self.last_grad_norm: torch.Tensor | None = None
        self._step_callbacks = [c for c in self.callbacks if overrides(c, "on_step_end")]
        self._save_requests: list[str] = []
        self._stop_requested = False
        self._params = [p for group in optimizer.param_groups for p in group["params"]]

    # -- requests from callbacks --------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary."""
        self._stop_requested = True
        self.state.stop_reason = reason

    def request_save(self, name: str) -> None:
        """Save a checkpoint named `name` once the current hook round is over."""
        if name not in self._save_requests:
            self._save_requests.append(name)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainState:
        state = self.state
        self._call("on_train_start")
        self.performance.start()
        while state.epoch < self.num_epochs and not self._done():
            state.epoch += 1
            self._call("on_epoch_start")
            train_loss = self._train_epoch()
            logs = self._end_epoch(train_loss)
            self._call("on_epoch_end", logs)
            self._act()
        state.stopped_early = self._stop_requested
        end_logs: dict[str, Any] = {"stop_reason": state.stop_reason}
        self._call("on_train_end", end_logs)
        self._act()
        return state

    def _done(self) -> bool:
        at_max = self.max_steps is not None and self.state.global_step >= self.max_steps
        return self._stop_requested or at_max

    def _train_epoch(self) -> float:
        """Run one epoch of optimizer updates; return the epoch's mean training loss."""
        self.forward_model.train()
        k = self.accumulation_steps
        running = RunningLoss(self.device)
        logged_loss, logged_weight = 0.0, 0.0
        interval_steps = interval_samples = 0
        data_seconds = 0.0
        batches = iter(self.train_loader)
        while not self._done():
            fetch_start = time.perf_counter()
            window = list(itertools.islice(batches, k))
            data_seconds += time.perf_counter() - fetch_start
            if not window:
                break
            samples = self._accumulate(window, running)
            self._optimizer_step()
            interval_steps += 1
            interval_samples += samples
            for callback in self._step_callbacks:
                callback.on_step_end(self)
            step = self.state.global_step
            if step % self.log_every_n_steps == 0:
                # The only host-device sync of the training step, once per log interval.
                total_loss, total_weight = running.read()
                mean = (total_loss - logged_loss) / max(total_weight - logged_weight, 1e-12)
                logged_loss, logged_weight = total_loss, total_weight
                stats = self.performance.interval(interval_steps, interval_samples, data_seconds)
                interval_steps = interval_samples = 0
                data_seconds = 0.0
                self._log_train(mean, stats)
            if self.eval_every_n_steps and step % self.eval_every_n_steps == 0:
                self._evaluate()
                self.forward_model.train()
        if interval_steps:
            self.performance.interval(interval_steps, interval_samples, data_seconds)
        total_loss, total_weight = running.read()
        if total_weight == 0:
            raise ValueError(
                f"epoch {self.state.epoch} trained on no data: the train loader yielded no batches"
            )
        return total_loss / total_weight

    def _accumulate(self, window: list[Any], running: RunningLoss) -> int:
        """Forward and backward over one window; gradients equal those of one big batch."""
        if self.device.type != "cpu":
            window = [move_to_device(batch, self.device) for batch in window]
        weights: list[int | torch.Tensor] = []
        total: int | torch.Tensor = 1
        if len(window) > 1:
            # Normalise by the whole window's item count, known before any forward pass.
            weights = [self.step_fn.weight(batch) for batch in window]
            total = sum(weights[1:], start=weights[0])
        scaler = self.precision.scaler
        samples = 0
        for i, batch in enumerate(window):
            with self.precision.autocast():
                out = self.step_fn(self.forward_model, batch)
            loss = out.loss
            if loss.ndim != 0:
                raise ValueError(
                    f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}; "
                    "use a loss with reduction='mean'"
                )
            scaled = loss * (weights[i] / total) if weights else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            running.add(loss.detach(), out.weight)
            samples += out.num_samples
        return samples

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip the window's gradient, step, advance the schedule."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1

    # -- evaluation, logging, requests --------------------------------------------------------

    def _evaluate(self) -> dict[str, Any] | None:
        if self.evaluate_fn is None:
            return None
        state = self.state
        metrics = self.evaluate_fn(self.forward_model)
        prefixed = {f"val_{name}": float(value) for name, value in metrics.items()}
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
        record = {f"val/{name}": float(value) for name, value in metrics.items()}
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

    def _end_epoch(self, train_loss: float) -> dict[str, Any]:
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
        self._emit("epoch", {"train/epoch_loss": train_loss, "lr": lr})
        return logs

    def _log_train(self, loss: float, stats: dict[str, float]) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])
        record: dict[str, Any] = {"train/loss": loss, "lr": lr, **stats}
        if self.last_grad_norm is not None:
            record["grad_norm"] = float(self.last_grad_norm)
        self.tracker.update({"train_step_loss": loss, "learning_rate": lr}, self.state.global_step)
        self._emit("train", record)
        self._call("on_log", record)

    def _emit(self, event: str, values: dict[str, Any]) -> None:
        record = {"event": event, "step": self.state.global_step, "epoch": self.state.epoch}
        record.update(values)
        for logger in self.loggers:
            logger.log(record)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _act(self) -> None:
        """Carry out the saves the callbacks asked for."""
        requests, self._save_requests = self._save_requests, []
        if self.save_fn is not None:
            for name in requests:
                self.save_fn(name, self)
