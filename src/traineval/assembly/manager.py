"""TrainingManager: the specification's facade over a run's phases.

The manager fills one `build.Assembly` phase by phase (`build`: each phase reads the
`TrainingConfig`), then `execution` drives the `Loop` over the parts. The config also reaches the
builders the phases call (optimizer and schedule, the default callbacks, loggers, the mode's
`check` and `plan` through its `Context`, checkpoint records, resume checks); the loop, the
step functions, the metrics and the callbacks themselves take plain values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback
from ..callbacks.base import check_callbacks
from ..callbacks.defaults import default_callbacks
from ..config.training_config import TaskType, TrainingConfig, TrainingMode
from ..data.splits import SCHEMA_FILE
from ..evaluation.inference import Predictions, PredictOptions, predict
from ..evaluation.model_evaluator import ModelEvaluator
from ..evaluation.report import task_of
from ..loggers.base import check_loggers
from ..modes import Mode, resolve_mode
from ..modes.contract import closing_step
from ..runs import rundir
from ..runs.checkpoint import (
    load_checkpoint,
    save_checkpoint_file,
)
from ..runs.checkpoint_writer import CheckpointWriter
from ..runs.resume import check_same_data
from ..runs.rundir import default_run_dir
from ..runs.tracking import MetricsTracker
from ..system import cpu_threads
from ..system.distributed import model_state, optimizer_state
from ..system.distributed import setup as setup_distributed
from ..training.batches import OutputTransform, check_loaders
from ..training.loop import Loop, TrainState
from ..training.lr_finder import LearningRateSearch, RangeTest
from ..training.monitor import PerformanceMonitor
from ..training.optim import configured_optimizer, configured_scheduler
from ..training.precision import make_current, resolve_device, resolve_precision
from ..training.run_checkpoints import (
    Contents,
    checkpoint_payload,
    finished,
    save_from_loop,
)
from . import build, execution
from .lr_search import search_learning_rate
from .results import TrainingResult

logger = logging.getLogger(__name__)


class TrainingManager:
    """Comprehensive training manager: builds the pieces from the config and trains.

    Example:
        >>> manager = TrainingManager(TrainingConfig(device="cpu"))
        >>> manager.device
        device(type='cpu')
    """

    def __init__(self, config: TrainingConfig) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        self.config = config
        # Under torchrun: join the process group; each rank gets its own device.
        self.distributed, device = setup_distributed(
            config.device, config.distributed_backend, config.distributed_timeout_seconds
        )
        self.device = resolve_device(device)
        make_current(self.device)
        self.logger = logger
        self.current_epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.early_stopping_counter = 0
        self.metrics_tracker = MetricsTracker()
        self.performance_monitor = PerformanceMonitor(self.device)
        self.output_dir = Path(config.output_dir) if config.output_dir else default_run_dir("run")
        # A config-file run's whole config (data, model, training, evaluation, mode), written
        # to config.yaml when the run starts instead of the training section alone
        self.run_config: dict[str, Any] | None = None
        # JSON files a config-file run keeps beside config.yaml, written when the run starts
        self.run_files: dict[str, Any] = {}
        if not config.output_dir:  # one run directory for all ranks: rank 0's timestamp
            self.output_dir = self.distributed.gather(self.output_dir)[0]

    # -- builders -----------------------------------------------------------------------------

    def setup_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Build the configured optimizer (no weight decay on biases and norm weights)."""
        return configured_optimizer(model, self.config)

    def setup_scheduler(
        self, optimizer: torch.optim.Optimizer, total_steps: int | None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Build the configured schedule over `total_steps` optimizer updates, with warmup."""
        return configured_scheduler(optimizer, self.config, total_steps)

    # -- training -----------------------------------------------------------------------------

    def train(
        self,
        model: nn.Module,
        train_loader: Iterable[Any] | Callable[[], Any] | str,
        val_loader: Iterable[Any] | None = None,
        *,
        task_type: TaskType | str | None = None,
        loss_function: Any = None,
        evaluator: ModelEvaluator | None = None,
        callbacks: Sequence[Callback] = (),
        mode: TrainingMode | str | Mode = TrainingMode.SUPERVISED,
        resume_from: str | Path | None = None,
        loggers: Sequence[Any] = (),
        output_transform: OutputTransform | None = None,
    ) -> TrainingResult:
        """Train `model`; evaluate on `val_loader` each epoch and every `eval_frequency` updates.

        `mode` is a `TrainingMode`, a registered mode name ("federated"), or a Mode instance
        with its settings (`traineval.modes.Federated(clients=10)`, or your own Mode); a
        name takes its settings from the config's `mode_settings`.

        `train_loader` is what the mode trains on: batches; in federated mode also a list of
        client loaders; in reinforcement mode an environment factory or name ("CartPole").
        `loggers` adds your own (`log(metrics, step)`; `log_config`, `close` optional) beside
        metrics.jsonl and TensorBoard; a logger that fails is reported once, never fatal.
        What the model returns is read by one rule (`traineval.training.batches`): a tensor, a tuple
        whose first element is the prediction, a mapping or Hugging Face `ModelOutput` with
        `logits`; `output_transform` reads anything else. Without a `loss_function`, a model
        whose forward takes `labels` (Hugging Face models) trains on its own loss for dict
        batches that carry `labels`, weighed so that accumulation and DDP stay exact.
        `resume_from` continues a run from a checkpoint path, or with "auto" from the valid
        checkpoint in `output_dir` furthest along by its recorded step (starting fresh when
        there is none; refusing when every one is corrupt). The resumed run
        ends exactly where the uninterrupted one would (same weights, same per-step losses),
        given the same model, data and loaders.

        Returns a `TrainingResult`: `result["training_history"]` has per-epoch `train_loss`,
        `val_loss`, `learning_rate`, and `val_metrics` (one dict per evaluation).

        Raises:
            TrainingInterrupted: SIGTERM or Ctrl-C; a resumable checkpoint was saved first.
            NonFiniteError: a NaN or infinite loss or gradient (named by epoch, step, batch).
        """
        check_loaders(train_loader=train_loader, val_loader=val_loader)
        check_loggers(loggers)
        callbacks = check_callbacks(callbacks)  # (a generator of them, too)
        build.check_resume_target(self.config, resume_from)
        request = build.Request(
            model, train_loader, val_loader, task_of(task_type), loss_function, evaluator,
            [*callbacks], mode, resume_from, loggers, output_transform,
        )  # fmt: skip
        c, job = self.config, self.distributed
        run = self.plan(request)
        run.monitor = build.choose_monitor(
            c, run.plan, run.data.val_loader, evaluator, request.task_type, run.mode
        )
        with (
            closing_step(run.plan.step),  # its environments' worker processes, say
            self.hold_output_dir(),  # until the run ends: one run per output_dir
            cpu_threads.applied(c.cpu_threads, self.device, model),
        ):
            rundir.settle_set_aside(self.output_dir, job)  # what a killed overwrite left
            run.payload = build.load_resume(self.output_dir, resume_from, c, run.mode, job, model)
            if run.payload is not None:
                check_same_data(self.output_dir, self.run_config, self.run_files.get(SCHEMA_FILE))
            rundir.claim(
                self.output_dir,
                job,
                resuming=resume_from is not None,
                overwrite=c.overwrite_output_dir,
            )
            if run.payload is not None and finished(run.payload, c):
                return execution.already_finished(self, model, run.payload, run.monitor)
            with rundir.overwriting(self.output_dir, job):
                return execution.execute(self, run)

    def optimization(self, run: build.Assembly, *, schedule: bool = True) -> build.Optimization:
        """The model placed (wrapped for DDP / FSDP, resumed weights) and what updates it:
        optimizer, schedule (unless `schedule` is off), their resumed states, compile."""
        c, job, model = self.config, self.distributed, run.request.model
        placed = build.place_model(model, c, run.plan, job, self.device, run.payload)
        builders = (self.setup_optimizer, self.setup_scheduler)
        return build.optimization(run, placed, c, builders, schedule=schedule)

    def plan(self, request: build.Request) -> build.Assembly:
        """The mode, the loss, the mode's plan, the precision and the data shards: the
        first phases of a run, shared by `train` and `find_learning_rate`."""
        c, job, model = self.config, self.distributed, request.model
        run_mode = resolve_mode(request.mode, c)
        build.check_inputs(c, model, run_mode, request.loss_function)  # before any work
        loss = build.choose_loss(c, request, run_mode, self.device)
        plan, precision = build.plan_mode(c, request, run_mode, loss, job, self.device)
        data = build.shard_data(plan, request.train_loader, request.val_loader, c, job)
        return build.Assembly(request, run_mode, loss, plan, precision, data)

    def predict(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        task_type: TaskType | str | None = None,
        output_transform: OutputTransform | None = None,
    ) -> Predictions:
        """The model's outputs, probabilities and classes over `loader`, on this run's device
        and in its precision (see `traineval.predict`)."""
        precision = resolve_precision(self.config.precision, self.device)
        return predict(
            model.to(self.device),
            loader,
            PredictOptions(output_transform=output_transform),
            device=self.device,
            precision=precision,
            task_type=task_of(task_type),
        )

    def find_learning_rate(
        self,
        model: nn.Module,
        train_loader: Iterable[Any] | Callable[[], Any] | str,
        *,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_steps: int = 100,
        divergence: float = 4.0,
        smoothing: float = 0.9,
        task_type: TaskType | str | None = None,
        loss_function: Any = None,
        mode: TrainingMode | str | Mode = TrainingMode.SUPERVISED,
    ) -> LearningRateSearch:
        """The learning-rate range test: up to `num_steps` updates of this config's training
        (optimizer, precision, accumulation, clipping, mode) at rates growing exponentially
        from `min_lr` to `max_lr`, stopped once the loss's moving average (`smoothing`)
        passes `divergence` times its best. The model's weights and the random streams are
        restored afterwards (see `traineval.training.lr_finder`).

        Returns a `LearningRateSearch` (rates, losses, `suggestion`; `.plot(path)`).
        """
        search = RangeTest.checked(min_lr, max_lr, num_steps, divergence, smoothing)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        request = build.Request(
            model,
            train_loader,
            task_type=task_of(task_type),
            loss_function=loss_function,
            mode=mode,
        )
        return search_learning_rate(self, request, search)

    def _result(
        self, state: TrainState, monitor_name: str, seconds: float, checkpoints: dict[str, str]
    ) -> TrainingResult:
        """The run's result; the specification's counters on the manager follow the state."""
        self.current_epoch, self.global_step = state.epoch, state.global_step
        self.best_metric, self.best_epoch = state.best_metric, state.best_epoch
        performance = self.performance_monitor.summary()
        return TrainingResult.of(
            state, monitor_name, self.output_dir, seconds, performance, checkpoints
        )

    def _default_callbacks(self) -> list[Callback]:
        return default_callbacks(self.config, self.distributed.is_main)

    def hold_output_dir(self) -> AbstractContextManager[None]:
        """Hold `output_dir` for this run: a second run on it is refused with `RunDirInUse`,
        naming the process that holds it. Re-entrant in one thread; released when the run
        ends."""
        return rundir.held_by_the_job(self.output_dir, self.distributed)

    # -- checkpoints --------------------------------------------------------------------------

    def _save_from_loop(
        self, name: str, loop: Loop, mode: Mode, writer: CheckpointWriter | None = None
    ) -> Path:
        self.best_metric, self.best_epoch = loop.state.best_metric, loop.state.best_epoch
        folder = self.output_dir / "checkpoints"
        return save_from_loop(name, loop, self.config, folder, mode.to_dict(), writer)

    def save_checkpoint(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        name: str,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> Path:
        """Save model, optimizer and scheduler to `output_dir/checkpoints/{name}.pt` atomically.

        Under torchrun call it on every rank (FSDP gathers the full state); rank 0 writes.
        """
        weights, state = model_state(model), optimizer_state(model, optimizer)
        contents = Contents(epoch, self.global_step, weights, state, scheduler=scheduler)
        contents.best_metric, contents.best_epoch = self.best_metric, self.best_epoch
        payload = checkpoint_payload(name, self.config, contents)
        path = self.output_dir / "checkpoints" / f"{name}.pt"
        if self.distributed.is_main:
            save_checkpoint_file(payload, path)
            self.logger.info("Checkpoint saved: %s", path)
        self.distributed.barrier()
        return path

    def load_checkpoint(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint (tensors and plain values only) into `model` and friends.

        Returns the checkpoint dict (epoch, global_step, history, config, ...).
        """
        device = self.device
        return load_checkpoint(
            path, model, map_location=device, optimizer=optimizer, scheduler=scheduler
        )
