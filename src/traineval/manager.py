"""TrainingManager: the public facade, and the only place that reads a `TrainingConfig`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .averaging import WeightAverage
from .batches import ModelLoss, OutputTransform, label_shift
from .callbacks import (
    BestWeights,
    Callback,
    EarlyStopping,
    EpochSummary,
    ModelCheckpoint,
    ProgressBar,
)
from .checkpoint import (
    load_checkpoint_file,
    remove_stale_temporaries,
    save_checkpoint_file,
)
from .config import TaskType, TrainingConfig, TrainingMode
from .distributed import (
    is_sharded,
    load_optimizer_state,
    model_state,
    optimizer_state,
    shard_eval_loader,
    shard_train_loader,
    wrap_model,
)
from .distributed import setup as setup_distributed
from .evaluation import Evaluator
from .loggers import JsonlLogger, LoggerHub
from .loop import Loop, Monitor, TrainState
from .lr_finder import LearningRateSearch, RangeTest
from .modes.setup import prepare_mode
from .monitor import PerformanceMonitor
from .optim import check_prefixes, configured_optimizer, configured_scheduler, freeze
from .precision import Precision, resolve_device, resolve_precision
from .resume import check_compatible, find_checkpoint, stop_on_signals, truncate_events
from .run_checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_payload,
    finished,
    restore_loop,
    save_from_loop,
    training_weights,
)
from .seeding import (
    capture_rng,
    data_generators,
    deterministic_algorithms,
    restore_rng,
    seed_everything,
)
from .steplog import NonFiniteError
from .tasks import RegressionMSE, default_loss
from .tracking import MetricsTracker

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingResult(Mapping[str, Any]):
    """What `train` returns; also readable as a mapping (`result["best_metric"]`)."""

    training_history: dict[str, list[Any]]
    best_metric: float | None
    best_epoch: int | None
    best_step: int | None
    global_step: int
    epochs_completed: int
    stopped_early: bool
    stop_reason: str | None
    monitor_metric: str
    output_dir: str
    train_seconds: float
    performance: dict[str, Any]
    checkpoints: dict[str, str]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(f"no result named {key!r}; available: {', '.join(self._keys())}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._keys()}


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
        self.logger = logger
        self.current_epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.early_stopping_counter = 0
        self.metrics_tracker = MetricsTracker()
        self.performance_monitor = PerformanceMonitor(self.device)
        self.output_dir = Path(config.output_dir) if config.output_dir else _default_run_dir()
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
        task_type: TaskType | None = None,
        loss_function: Any = None,
        evaluator: Evaluator | None = None,
        callbacks: Sequence[Callback] = (),
        mode: TrainingMode = TrainingMode.SUPERVISED,
        resume_from: str | Path | None = None,
        loggers: Sequence[Any] = (),
        output_transform: OutputTransform | None = None,
    ) -> TrainingResult:
        """Train `model`; evaluate on `val_loader` each epoch and every `eval_frequency` updates.

        `train_loader` is what the mode trains on: batches; in federated mode also a list of
        client loaders; in reinforcement mode an environment factory or name ("CartPole").
        `loggers` adds your own (`log(metrics, step)`, `log_config`, `close`) beside
        metrics.jsonl and TensorBoard; a logger that fails is reported once, never fatal.
        What the model returns is read by one rule (`traineval.batches`): a tensor, a tuple
        whose first element is the prediction, a mapping or Hugging Face `ModelOutput` with
        `logits`; `output_transform` reads anything else. Without a `loss_function`, a model
        whose forward takes `labels` (Hugging Face models) trains on its own loss for dict
        batches that carry `labels`, weighed so that accumulation and DDP stay exact.
        `resume_from` continues a run from a checkpoint path, or with "auto" from the newest
        valid checkpoint in `output_dir` (starting fresh when there is none). The resumed run
        ends exactly where the uninterrupted one would (same weights, same per-step losses),
        given the same model, data and loaders.

        Returns a `TrainingResult`: `result["training_history"]` has per-epoch `train_loss`,
        `val_loss`, `learning_rate`, and `val_metrics` (one dict per evaluation).

        Raises:
            TrainingInterrupted: SIGTERM or Ctrl-C; a resumable checkpoint was saved first.
            NonFiniteError: a NaN or infinite loss or gradient (named by epoch, step, batch).
        """
        c = self.config
        job = self.distributed
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_prefixes(model, "frozen_parameters", c.frozen_parameters)  # before any work
        check_prefixes(model, "lr_multipliers", c.lr_multipliers)
        user_loss = loss_function is not None
        shaped = c.label_smoothing or c.class_weights is not None
        if shaped and user_loss:
            raise ValueError(
                "label_smoothing / class_weights shape the default loss, but a loss_function "
                "was passed: set them on your loss (e.g. nn.CrossEntropyLoss(weight=..., "
                "label_smoothing=...)) and leave the config's at their defaults"
            )
        if shaped and mode not in (TrainingMode.SUPERVISED, TrainingMode.FEDERATED):
            raise ValueError(
                f"label_smoothing / class_weights are not supported in mode='{mode.value}' "
                "(they shape the supervised cross-entropy)"
            )
        if loss_function is None:
            loss_function = (
                RegressionMSE()
                if mode is TrainingMode.UNSUPERVISED
                else default_loss(
                    task_type,
                    label_smoothing=c.label_smoothing,
                    class_weight=self._class_weights(train_loader),
                )
            )
        # The Hugging Face convention: a model that takes `labels` computes its own loss,
        # unless the config shapes the default loss (as the HF Trainer's label smoothing does).
        supervised = mode in (TrainingMode.SUPERVISED, TrainingMode.FEDERATED)
        model_loss = ModelLoss.of(model) if supervised and not (user_loss or shaped) else None
        setup = prepare_mode(
            mode,
            c,
            train_loader,
            val_loader,
            loss_function,
            user_loss=user_loss,
            job=job,
            output_transform=output_transform,
            model_loss=model_loss,
            label_shift=label_shift(model),  # for traineval's token loss
        )
        batches: Iterable[Any] = setup.loader
        if not setup.uses_own_loader:
            batches = shard_train_loader(batches, job, c.seed)
        if val_loader is not None:
            val_loader = shard_eval_loader(val_loader, job)
        updates_per_epoch = _updates_per_epoch(batches, c.gradient_accumulation_steps)
        total_steps = _total_steps(updates_per_epoch, c.num_epochs, c.max_steps)
        # An autoencoder's evaluation compares outputs with inputs: regression metrics.
        metric_task = TaskType.REGRESSION if mode is TrainingMode.UNSUPERVISED else task_type
        monitor = setup.monitor(c) or self._monitor(val_loader, evaluator, metric_task)
        found = find_checkpoint(self.output_dir, resume_from) if resume_from is not None else None
        payload: dict[str, Any] | None = None
        if found is not None:
            resume_path, payload = found
            if payload.get("format") != CHECKPOINT_FORMAT or "loop" not in payload:
                raise ValueError(f"{str(resume_path)!r} is not a resumable traineval checkpoint")
            check_compatible(
                payload["config"], c.to_dict(), payload.get("world_size", 1), job.world_size
            )
            strategy = c.distributed_strategy if job.enabled else None
            if payload.get("distributed_strategy") != strategy:
                raise ValueError(
                    "cannot resume: the checkpoint was written with distributed_strategy="
                    f"{payload.get('distributed_strategy')!r}, this run uses {strategy!r}"
                )
            logger.info("resuming from %s (step %d)", resume_path, payload["global_step"])
        elif resume_from is not None:
            logger.info("no checkpoint to resume from in %s; starting fresh", self.output_dir)
        self._claim_output_dir(resuming=resume_from is not None)
        if payload is not None and finished(payload["loop"], c):
            logger.info(
                "the run in %s already finished (step %d); nothing to do",
                self.output_dir,
                payload["global_step"],
            )
            model.load_state_dict(payload["model"])
            state = TrainState()
            state.load_state_dict(payload["loop"])
            return self._result(state, monitor.name, 0.0, {})

        # Ranks draw different dropout masks, like one batch; federated and reinforcement
        # ranks share one stream (a round's clients; each update's base seed, which the
        # rank's own episodes derive from).
        shared = mode in (TrainingMode.FEDERATED, TrainingMode.REINFORCEMENT)
        seed_everything(c.seed + (0 if shared else job.rank))
        model.to(self.device)
        if payload is not None:
            model.load_state_dict(training_weights(payload))  # full, before any sharding
        if c.frozen_parameters:  # before DDP registers its gradient hooks
            frozen = freeze(model, c.frozen_parameters)
            logger.info("froze %d parameter tensors (%s)", frozen, ", ".join(c.frozen_parameters))
        # DDP wraps; FSDP shards `model` in place, so the optimizer is built after this.
        if setup.wraps_model:
            wrapped, no_sync = wrap_model(model, self.device, job, c)
        else:  # the loop averages the gradients over the ranks itself
            job.broadcast_weights(model)
            wrapped, no_sync = model, None
        precision = resolve_precision(c.precision, c.mixed_precision, self.device)
        # federated: the server's optimizer (whose lr is the clients'), and the step with it
        optimizer = setup.optimizer(
            model, c, loss_function, precision, self.setup_optimizer, job=job
        )
        # A constant rate without warmup never changes: no scheduler (creating one would also
        # wrap optimizer.step in torch's step counter, work on every update).
        scheduler = None if _constant(c) else self.setup_scheduler(optimizer, total_steps)
        if payload is not None:
            load_optimizer_state(model, optimizer, payload["optimizer"])
            if payload["scheduler"] is not None and scheduler is not None:
                scheduler.load_state_dict(payload["scheduler"])
            if precision.scaler is not None and payload.get("scaler") is not None:
                precision.scaler.load_state_dict(payload["scaler"])
        forward_model: nn.Module = (
            torch.compile(wrapped, mode=c.compile_mode) if c.compile else wrapped  # type: ignore[assignment]
        )
        # Under DDP, evaluate the plain module: DDP's forward would broadcast buffers, a
        # collective that ranks with uneven evaluation shares would not all reach. An FSDP
        # module's forward is itself a collective: its ranks evaluate in lockstep.
        eval_model = model if job.enabled else None
        lockstep = is_sharded(model)
        if evaluator is not None:
            evaluator.run_dir = self.output_dir  # where its predictions and plots go later
        evaluate_fn = setup.evaluate_fn(val_loader, self.device, precision, job)
        if evaluate_fn is None and val_loader is not None:
            evaluator = evaluator or Evaluator()

            def evaluate_fn(m: nn.Module) -> dict[str, float]:
                return evaluator.evaluate_model(
                    eval_model if eval_model is not None else m,
                    val_loader,
                    self.device,
                    None if model_loss is not None else loss_function,  # None: the model's
                    task_type=task_type,
                    output_transform=output_transform,
                    training_mode=mode,
                    precision=precision,
                    write_files=False,  # predictions and plots are for final evaluations
                    distributed=job,
                    lockstep=lockstep,
                )

        hub = LoggerHub([])  # rank 0 alone writes files and logs
        if job.is_main:
            c.__class__.from_dict({**c.to_dict(), "output_dir": str(self.output_dir)}).save_yaml(
                self.output_dir / "config.yaml"
            )
            events = self.output_dir / "metrics.jsonl"
            if payload is not None:
                truncate_events(events, payload["global_step"])
            else:
                events.unlink(missing_ok=True)
            hub = LoggerHub(
                [
                    JsonlLogger(events),
                    *self._optional_loggers(payload["global_step"] if payload else 0),
                    *loggers,
                ]
            )
        hub.log_config(c.to_dict())
        checkpoints: dict[str, str] = {}

        def save_fn(name: str, loop: Loop) -> Path:
            path = self._save_from_loop(name, loop, precision)
            checkpoints[name] = str(path)
            return path

        loop = Loop(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scheduler=scheduler,
            step_fn=setup.step_fn,
            train_loader=batches,
            device=self.device,
            precision=precision,
            monitor=monitor,
            num_epochs=c.num_epochs,
            updates_per_epoch=updates_per_epoch,
            accumulation_steps=c.gradient_accumulation_steps,
            max_grad_norm=setup.max_grad_norm(c),
            max_steps=c.max_steps,
            eval_every_n_steps=c.eval_frequency if evaluate_fn is not None else None,
            log_every_n_steps=c.log_frequency,
            evaluate_fn=evaluate_fn,
            save_fn=save_fn,
            callbacks=[*self._default_callbacks(), *callbacks],
            loggers=hub,
            tracker=self.metrics_tracker,
            performance=self.performance_monitor,
            data_generators=data_generators(batches),  # federated: none (rounds reseed)
            skip_non_finite=c.skip_nonfinite_steps,
            layer_norms=c.log_layer_grad_norms,
            job=job,
            no_sync=no_sync,
            average_gradients=job.enabled and not setup.wraps_model,
            weight_average=WeightAverage(model, c.ema_decay, c.ema_warmup) if c.ema_decay else None,
        )
        if payload is not None:
            restore_loop(loop, payload)
        started = time.perf_counter()
        try:
            with deterministic_algorithms(c.deterministic), stop_on_signals(loop):
                state = loop.run()
            if state.best_metric is not None:
                hub.log({"event": "best", "best/metric": state.best_metric}, state.global_step)
            self.early_stopping_counter = monitor.num_bad
            result = self._result(state, monitor.name, time.perf_counter() - started, checkpoints)
            summary = {k: v for k, v in result.to_dict().items() if k != "training_history"}
            if job.is_main:
                (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            hub.close()  # after summary.json, so artifact loggers take it along
        return result

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
        task_type: TaskType | None = None,
        loss_function: Any = None,
        mode: TrainingMode = TrainingMode.SUPERVISED,
    ) -> LearningRateSearch:
        """The learning-rate range test: up to `num_steps` updates of this config's training
        (optimizer, precision, accumulation, clipping, mode) at rates growing exponentially
        from `min_lr` to `max_lr`, stopped once the loss's moving average (`smoothing`)
        passes `divergence` times its best. The model's weights and the random streams are
        restored afterwards (see `traineval.lr_finder`).

        Returns a `LearningRateSearch` (rates, losses, `suggestion`; `.plot(path)`).
        """
        import tempfile

        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr <= 0:
            raise ValueError(f"min_lr={min_lr!r} is invalid: expected a number > 0")
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or max_lr <= min_lr:
            raise ValueError(f"max_lr={max_lr!r} is invalid: expected a number > min_lr={min_lr}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps={num_steps!r} is invalid: expected an integer >= 2")
        if (
            isinstance(divergence, bool)
            or not isinstance(divergence, (int, float))
            or divergence <= 1
        ):
            raise ValueError(f"divergence={divergence!r} is invalid: expected a number > 1")
        if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing={smoothing!r} is invalid: expected a number in [0, 1)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        search = RangeTest(float(min_lr), float(max_lr), num_steps, divergence, smoothing)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        generators = data_generators(train_loader)
        streams = capture_rng(generators)
        try:
            with tempfile.TemporaryDirectory(prefix="traineval-lr-") as folder:
                config = dataclasses.replace(
                    self.config,
                    learning_rate=float(min_lr),
                    scheduler_type="constant",
                    warmup_steps=0,
                    warmup_ratio=0.0,
                    num_epochs=num_steps,  # at least one update per epoch; max_steps ends it
                    max_steps=num_steps,
                    log_frequency=1,  # the loss of every update is read: it is the point
                    early_stopping_patience=0,
                    output_dir=folder,
                    overwrite_output_dir=True,
                    save_best_model=False,
                    save_last_checkpoint=False,
                    checkpoint_save_frequency=0,
                    checkpoint_every_n_steps=0,
                    restore_best_weights=False,
                    tensorboard_logging=False,
                    wandb_logging=False,
                    mlflow_logging=False,
                    progress_bar=False,
                    ema_decay=0.0,
                    skip_nonfinite_steps=0,
                )
                try:
                    TrainingManager(config).train(
                        model,
                        train_loader,
                        task_type=task_type,
                        loss_function=loss_function,
                        mode=mode,
                        callbacks=[search],
                    )
                except NonFiniteError:
                    search.stop_reason = "non-finite loss"
        finally:
            model.load_state_dict(weights)
            restore_rng(streams, generators)
        return search.result()

    def _class_weights(self, train_loader: Any) -> torch.Tensor | None:
        """The config's class weights on the device; "balanced" reads the training labels
        (every client's in federated mode): n / (classes x count), scikit-learn's rule."""
        weights = self.config.class_weights
        if weights is None:
            return None
        if weights != "balanced":
            return torch.tensor(weights, dtype=torch.float32, device=self.device)
        loaders = train_loader if isinstance(train_loader, (list, tuple)) else [train_loader]
        if not all(hasattr(loader, "dataset") for loader in loaders):
            raise ValueError(
                "class_weights='balanced' reads the labels of the train loader's dataset; this "
                "train_loader has none: pass one weight per class instead"
            )
        from .data.splits import dataset_labels

        labels = np.concatenate([dataset_labels(loader.dataset) for loader in loaders])
        labels = labels[labels >= 0].astype(np.int64)  # ignored / unlabeled samples
        if labels.size == 0:
            raise ValueError("class_weights='balanced': the training data has no labels")
        counts = np.bincount(labels).astype(np.float64)
        balanced = np.where(counts > 0, labels.size / (len(counts) * np.maximum(counts, 1)), 1.0)
        return torch.tensor(balanced, dtype=torch.float32, device=self.device)

    def _result(
        self, state: TrainState, monitor_name: str, seconds: float, checkpoints: dict[str, str]
    ) -> TrainingResult:
        self.current_epoch = state.epoch
        self.global_step = state.global_step
        self.best_metric = state.best_metric
        self.best_epoch = state.best_epoch
        return TrainingResult(
            training_history=state.history,
            best_metric=state.best_metric,
            best_epoch=state.best_epoch,
            best_step=state.best_step,
            global_step=state.global_step,
            epochs_completed=state.epoch,
            stopped_early=state.stopped_early,
            stop_reason=state.stop_reason,
            monitor_metric=monitor_name,
            output_dir=str(self.output_dir),
            train_seconds=seconds,
            performance=self.performance_monitor.summary(),
            checkpoints=checkpoints,
        )

    def _monitor(
        self, val_loader: Any, evaluator: Evaluator | None, task_type: TaskType | None
    ) -> Monitor:
        c = self.config
        name = c.monitor_metric
        if val_loader is None and name.startswith("val_"):
            logger.info("no val_loader: monitoring train_loss instead of %s", name)
            name = "train_loss"
        elif task_type is not None and name.startswith("val_"):
            names = ["loss", *(evaluator or Evaluator()).metric_names(task_type)]
            if name[len("val_") :] not in names:
                allowed = ", ".join(f"val_{n}" for n in names)
                raise ValueError(
                    f"monitor_metric={name!r} is invalid for {task_type.value}: expected one of "
                    f"{allowed}, or train_loss"
                )
        minimize = c.minimize_monitor if name == c.monitor_metric else True
        return Monitor(name, minimize=minimize, min_delta=c.early_stopping_min_delta)

    def _default_callbacks(self) -> list[Callback]:
        c = self.config
        main = self.distributed.is_main
        callbacks: list[Callback] = [ProgressBar(c.progress_bar if main else False)]
        if main:
            callbacks.append(EpochSummary())
        if c.early_stopping_patience > 0:
            callbacks.append(EarlyStopping(c.early_stopping_patience))
        callbacks.append(
            ModelCheckpoint(
                save_best=c.save_best_model,
                save_last=c.save_last_checkpoint,
                every_n_epochs=c.checkpoint_save_frequency,
                every_n_steps=c.checkpoint_every_n_steps,
            )
        )
        if c.restore_best_weights:
            callbacks.append(BestWeights())
        return callbacks

    def _claim_output_dir(self, resuming: bool) -> None:
        """Create the run directory; refuse to write over an earlier run's checkpoints."""
        checkpoints = self.output_dir / "checkpoints"
        if (
            not resuming
            and checkpoints.is_dir()
            and any(checkpoints.iterdir())
            and not self.config.overwrite_output_dir
        ):
            raise FileExistsError(
                f"output_dir={str(self.output_dir)!r} already holds checkpoints of an earlier "
                "run; resume it with resume_from='auto', choose another output_dir, or set "
                "overwrite_output_dir=true"
            )
        if self.distributed.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_stale_temporaries(checkpoints):
                logger.info("removed %s, left by a save that did not finish", path.name)
        self.distributed.barrier()  # the others start once rank 0 has the directory ready

    def _optional_loggers(self, resumed_step: int) -> list[Any]:
        """TensorBoard when asked (and installed); a missing package warns and names the extra."""
        c = self.config
        loggers: list[Any] = []
        if c.tensorboard_logging:
            try:
                from .loggers.tensorboard import TensorBoardLogger

                loggers.append(
                    TensorBoardLogger(
                        self.output_dir, purge_step=resumed_step + 1 if resumed_step else None
                    )
                )
            except ImportError as error:
                logger.warning("%s; logging to metrics.jsonl only", error)
        if c.wandb_logging:
            try:
                from .loggers.wandb import WandbLogger

                loggers.append(WandbLogger(self.output_dir, project=c.wandb_project))
            except ImportError as error:
                logger.warning("%s; logging to metrics.jsonl only", error)
            except Exception as error:  # a logging service must not stop training
                logger.warning("W&B could not start (%s); logging to metrics.jsonl only", error)
        if c.mlflow_logging:
            try:
                from .loggers.mlflow import MLflowLogger

                loggers.append(MLflowLogger(self.output_dir, c.mlflow_tracking_uri))
            except ImportError as error:
                logger.warning("%s; logging to metrics.jsonl only", error)
            except Exception as error:  # a tracking server that is down must not stop training
                logger.warning("MLflow could not start (%s); logging to metrics.jsonl only", error)
        return loggers

    # -- checkpoints --------------------------------------------------------------------------

    def _save_from_loop(self, name: str, loop: Loop, precision: Precision) -> Path:
        self.best_metric, self.best_epoch = loop.state.best_metric, loop.state.best_epoch
        return save_from_loop(
            name,
            loop,
            precision,
            config=self.config,
            job=self.distributed,
            folder=self.output_dir / "checkpoints",
        )

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
        payload = checkpoint_payload(
            name,
            config=self.config,
            epoch=epoch,
            global_step=self.global_step,
            weights=model_state(model),
            optimizer=optimizer_state(model, optimizer),
            scheduler=scheduler,
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
        )
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
        payload = load_checkpoint_file(path, map_location=self.device)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{str(path)!r} is not a traineval checkpoint")
        if is_sharded(model):
            raise ValueError(
                "load_checkpoint needs the plain model: load the weights before training "
                "shards it (FSDP), or resume with train(resume_from=...)"
            )
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        return payload


def _constant(config: TrainingConfig) -> bool:
    warmup = config.warmup_steps or config.warmup_ratio
    return config.scheduler_type == "constant" and not warmup


def _updates_per_epoch(loader: Any, accumulation: int) -> int | None:
    try:
        batches = len(loader)
    except TypeError:
        return None
    if batches == 0:
        raise ValueError("train_loader is empty: it has no batches to train on")
    return math.ceil(batches / accumulation)


def _total_steps(updates_per_epoch: int | None, epochs: int, max_steps: int | None) -> int | None:
    if updates_per_epoch is None:
        if max_steps is None:
            raise ValueError(
                "the train loader has no len(), so epochs have no known length: set max_steps"
            )
        return max_steps
    total = updates_per_epoch * epochs
    return min(total, max_steps) if max_steps is not None else total


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
