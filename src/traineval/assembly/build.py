"""Assembling a training run from its config: the named phases of `TrainingManager.train`.

Each phase reads the `TrainingConfig` and hands plain parts on; the loop reads no config.

    check_inputs    refuse what cannot work, before any work
    choose_loss     the user's loss, the default of the task, or the model's own
    plan_mode       the mode's checks and plan (`traineval.modes.contract`)
    shard_data      each rank's share of the data; updates per epoch and in all
    choose_monitor  the metric behind early stopping, the best checkpoint, plateau schedules
    load_resume     the checkpoint to continue from, checked against this config
    place_model     seeds, device, resumed weights, frozen parameters, DDP / FSDP
    optimization    precision, optimizer, schedule (resumed states), torch.compile
    evaluation      how the loop validates
    update_rule     how the loop makes each update (step, accumulation, clipping, EMA)
    placement       the device, the module the steps call, the data-parallel job
    run_length      epochs, updates, and how often the loop evaluates and logs
    open_loggers    config.yaml, metrics.jsonl and the optional loggers (rank 0)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.conditions import parse_condition, parse_duration
from ..config.config_file import write_run_config
from ..config.training_config import TaskType, TrainingConfig
from ..data.sharding import shard_eval_loader, shard_train_loader
from ..evaluation.model_evaluator import ModelEvaluator
from ..loggers import JsonlLogger, LoggerHub
from ..modes import Context, Mode, ModePlan
from ..runs.checkpoint import refuse_another_models
from ..runs.resume import (
    check_compatible,
    check_mode,
    find_checkpoint,
    logged_records,
    set_aside_later,
    truncate_events,
)
from ..system.distributed import Distributed, is_sharded, wrap_model
from ..system.seeding import reseed_held_generators, seed_everything
from ..tasks import RegressionMSE, default_loss, refuse_unreduced
from ..training.averaging import WeightAverage
from ..training.batches import ModelLoss, OutputTransform, in_eval_mode, label_shift
from ..training.loop import EvaluateFn, Monitor, Placement, RunLength, UpdateRule
from ..training.optim import (
    PlateauSchedule,
    changed_settings,
    check_prefixes,
    freeze,
    group_settings,
    keep_chosen_settings,
    restore_schedule,
)
from ..training.precision import Precision, refuse_half_weights, resolve_precision
from ..training.run_checkpoints import (
    in_shards,
    restore_optimizer,
    saved_weights,
    training_weights,
)

logger = logging.getLogger(__name__)

ANOTHER_MODEL_ADVICE = (
    "resume from a checkpoint of this model, or give the config the model options it was "
    "trained with"
)


def check_inputs(config: TrainingConfig, model: Any, mode: Mode, loss_function: Any) -> None:
    """Refuse a model that is not a Module, prefixes that name no parameter, and loss settings
    the run cannot honour."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_meta(model)
    check_prefixes(model, "frozen_parameters", config.frozen_parameters)
    check_prefixes(model, "lr_multipliers", config.lr_multipliers)
    _warn_batch_norm_accumulation(model, config.gradient_accumulation_steps)
    refuse_unreduced(loss_function)
    if not _shapes_loss(config):
        return
    if loss_function is not None:
        raise ValueError(
            "label_smoothing / class_weights shape the default loss, but a loss_function "
            "was passed: set them on your loss (e.g. nn.CrossEntropyLoss(weight=..., "
            "label_smoothing=...)) and leave the config's at their defaults"
        )
    if not mode.supervised_loss:
        raise ValueError(
            f"label_smoothing / class_weights are not supported in mode='{mode.name}' "
            "(they shape the supervised cross-entropy)"
        )


def _refuse_meta(model: nn.Module) -> None:
    """A model on the meta device has shapes and no values: nothing to train."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"the model's {meta!r} is on the meta device (a shape without values): build "
            "it on a real device, or materialise it first (model.to_empty(device='cpu'), "
            "then initialise or load its weights)"
        )


def _warn_batch_norm_accumulation(model: nn.Module, accumulation: int) -> None:
    """Accumulation equals one big batch, except for batch norm: it normalises each
    micro-batch by that micro-batch's statistics (the documented exception)."""
    if accumulation == 1:
        return
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        logger.warning(
            "gradient_accumulation_steps=%d with batch norm (%s%s): each micro-batch is "
            "normalised by its own statistics, so the update differs from one batch %d times "
            "as large (and the running statistics are updated per micro-batch); use a larger "
            "batch_size, or GroupNorm / LayerNorm, where that matters",
            accumulation,
            ", ".join(norms[:3]),
            ", ..." if len(norms) > 3 else "",
            accumulation,
        )


def _shapes_loss(config: TrainingConfig) -> bool:
    return bool(config.label_smoothing or config.class_weights is not None)


@dataclasses.dataclass
class LossChoice:
    """The loss of a run: `function` (the user's or the default), and `model_loss` when the
    model computes its own from `labels` (the Hugging Face convention)."""

    function: Any
    user_loss: bool
    model_loss: ModelLoss | None

    @property
    def for_evaluation(self) -> Any:
        """What the evaluator scores with: None lets it use the model's own loss."""
        return None if self.model_loss is not None else self.function


def choose_loss(
    config: TrainingConfig, request: Request, mode: Mode, device: torch.device
) -> LossChoice:
    """The user's loss, else the task's default (MSE for autoencoders); and whether a model
    that takes `labels` trains on its own loss (not when the config shapes the default)."""
    loss_function = request.loss_function
    user_loss = loss_function is not None
    if loss_function is None:
        loss_function = (
            RegressionMSE()
            if mode.reconstructs
            else default_loss(
                request.task_type,
                label_smoothing=config.label_smoothing,
                class_weight=class_weights(config, request.train_loader, device),
                balanced=config.class_weights == "balanced",
            )
        )
    own = mode.supervised_loss and not (user_loss or _shapes_loss(config))
    return LossChoice(loss_function, user_loss, ModelLoss.of(request.model) if own else None)


def class_weights(
    config: TrainingConfig, train_loader: Any, device: torch.device
) -> torch.Tensor | None:
    """The config's class weights on the device; "balanced" reads the training labels
    (every client's in federated mode): n / (classes x count), scikit-learn's rule."""
    weights = config.class_weights
    if weights is None:
        return None
    if weights != "balanced":
        return torch.tensor(weights, dtype=torch.float32, device=device)
    loaders = train_loader if isinstance(train_loader, (list, tuple)) else [train_loader]
    if not all(hasattr(loader, "dataset") for loader in loaders):
        raise ValueError(
            "class_weights='balanced' reads the labels of the train loader's dataset; this "
            "train_loader has none: pass one weight per class instead"
        )
    labels = np.concatenate([_sampled_labels(loader) for loader in loaders])
    labels = labels[labels >= 0].astype(np.int64)  # ignored / unlabeled samples
    if labels.size == 0:
        raise ValueError("class_weights='balanced': the training data has no labels")
    counts = np.bincount(labels).astype(np.float64)
    # scikit-learn's n / (classes x count) over the classes training shows; others 1.0
    shown = int((counts > 0).sum())
    balanced = np.where(counts > 0, labels.size / (shown * np.maximum(counts, 1)), 1.0)
    return torch.tensor(balanced, dtype=torch.float32, device=device)


def _sampled_labels(loader: Any) -> np.ndarray:
    """The labels of the samples a loader draws from: its dataset's, only the rows of a
    sampler over a subset (`SubsetRandomSampler`'s `indices`). A dataset whose labels
    cannot be read (dict samples, no length) is a ValueError saying what to pass."""
    from ..data.splits import dataset_labels

    try:
        labels = dataset_labels(loader.dataset)
    except (TypeError, KeyError, IndexError, ValueError, NotImplementedError) as error:
        raise ValueError(
            "class_weights='balanced' reads each training sample's label (a TensorDataset's "
            "second tensor, or sample[1] of a dataset with a length); this train_loader's "
            f"dataset {type(loader.dataset).__name__} gives none ({type(error).__name__}: "
            f"{error}): pass one weight per class instead"
        ) from error
    indices = getattr(getattr(loader, "sampler", None), "indices", None)
    return labels if indices is None else labels[np.asarray(list(indices), dtype=np.int64)]


def plan_mode(
    config: TrainingConfig,
    request: Request,
    mode: Mode,
    loss: LossChoice,
    job: Distributed,
    device: torch.device,
) -> tuple[ModePlan, Precision]:
    """The run's precision, and the mode's plan once it has checked what it refuses."""
    precision = resolve_precision(config.precision, device)
    refuse_half_weights(precision, request.model)
    ctx = Context(
        config=config,
        train_data=request.train_loader,
        val_loader=request.val_loader,
        loss_function=loss.function,
        user_loss=loss.user_loss,
        model_loss=loss.model_loss,
        output_transform=request.output_transform,
        label_shift=label_shift(request.model),  # for traineval's token loss
        job=job,
        device=device,
        precision=precision,
    )
    mode.check(ctx)
    plan = mode.plan(ctx)
    if not isinstance(plan, ModePlan):
        raise TypeError(
            f"{type(mode).__name__}.plan returned {type(plan).__name__}; expected a ModePlan"
        )
    return plan, precision


@dataclasses.dataclass
class Data:
    """This rank's batches and validation share, and the run's length in optimizer updates."""

    batches: Iterable[Any]
    val_loader: Any
    updates_per_epoch: int | None
    total_steps: int | None


def shard_data(
    plan: ModePlan, train_loader: Any, val_loader: Any, config: TrainingConfig, job: Distributed
) -> Data:
    """Each rank's share of the user's loaders (the modes' own loaders are theirs already)."""
    batches: Iterable[Any] = plan.loader
    for loader in (train_loader, val_loader):
        _reseed_workers(loader)
    if plan.loader is None:
        _compare_batch_size(train_loader, "train", "batch_size", config.batch_size)
        batches = shard_train_loader(train_loader, job, config.seed)
    if val_loader is not None:
        _check_not_empty(val_loader)
        _compare_batch_size(val_loader, "val", "eval_batch_size", config.eval_batch_size)
        val_loader = shard_eval_loader(val_loader, job)
    updates = updates_per_epoch(batches, config.gradient_accumulation_steps)
    return Data(
        batches, val_loader, updates, total_steps(updates, config.num_epochs, config.max_steps)
    )


def _reseed_workers(loader: Any) -> None:
    found = reseed_held_generators(loader)
    if found:
        logger.warning(
            "%s %s a NumPy generator: each DataLoader worker gets a copy of it and would draw "
            "the same numbers; traineval reseeds each worker's copy from the worker's seed "
            "(reproducible). To draw per worker yourself, create it in a worker_init_fn",
            ", ".join(found),
            "is" if len(found) == 1 else "are",
        )


def _compare_batch_size(loader: Any, role: str, field: str, batch_size: int | None) -> None:
    """Your DataLoader's batch size is the one used; say so when the config's `field`
    differs (the train loader's: a resume checks the config's, so it would miss a change
    of the loader's; the val loader's: eval_batch_size sizes only the loaders traineval
    builds)."""
    size = getattr(loader, "batch_size", None)
    if batch_size is None or not isinstance(loader, torch.utils.data.DataLoader):
        return
    if size not in (None, batch_size):
        why = "so that a resume can check it" if role == "train" else "to say what ran"
        logger.warning(
            "%s_loader's batch_size=%d differs from the config's %s=%d: %s uses the "
            "loader's; set %s=%d in the config %s",
            role,
            size,
            field,
            batch_size,
            "training" if role == "train" else "validation",
            field,
            size,
            why,
        )


def _check_not_empty(val_loader: Any) -> None:
    """An empty validation loader is refused before training, not after an epoch."""
    try:
        batches = len(val_loader)
    except TypeError:
        return
    if batches == 0:
        raise ValueError(
            "val_loader is empty: it has no batches to validate on (an empty validation "
            "split?); give it rows, or pass val_loader=None to train without validation"
        )


def updates_per_epoch(loader: Any, accumulation: int) -> int | None:
    """Optimizer updates in one pass over `loader` (None: it has no len())."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    if batches == 0:
        raise ValueError("train_loader is empty: it has no batches to train on")
    return math.ceil(batches / accumulation)


def total_steps(updates_per_epoch: int | None, epochs: int, max_steps: int | None) -> int | None:
    """Optimizer updates in the whole run."""
    if updates_per_epoch is None:
        if max_steps is None:
            raise ValueError(
                "the train loader has no len(), so epochs have no known length: set max_steps "
                "(a generator or other iterator is read once: for more than one pass over its "
                "data pass a list of batches or a DataLoader)"
            )
        return max_steps
    total = updates_per_epoch * epochs
    return min(total, max_steps) if max_steps is not None else total


def choose_monitor(
    config: TrainingConfig,
    plan: ModePlan,
    val_loader: Any,
    evaluator: ModelEvaluator | None,
    task_type: TaskType | None,
    mode: Mode,
) -> Monitor:
    """The mode's monitor, or `monitor_metric` (train_loss without validation), checked
    against the metrics the task produces, as the `stop_when` conditions are."""
    min_delta = config.early_stopping_min_delta
    # An autoencoder's evaluation compares outputs with inputs: regression metrics.
    task = TaskType.REGRESSION if mode.reconstructs else task_type
    names = None  # the validation metrics (a mode that validates itself: not known)
    if plan.monitor is None and plan.evaluate is None:  # the task's; before the data says
        tasks = [task] if task is not None else list(TaskType)
        names = list(dict.fromkeys(
            n for t in tasks for n in validation_metric_names(evaluator, t, plan.extra_metric_names)
        ))  # fmt: skip
    check_stop_when(config, val_loader is not None or plan.evaluate is not None, names)
    if plan.monitor is not None:
        return Monitor(plan.monitor.name, minimize=plan.monitor.minimize, min_delta=min_delta)
    name = config.monitor_metric
    if val_loader is None and name.startswith("val_"):
        _refuse_a_chosen_metric_without_validation(name, plan)
        logger.info("no val_loader: monitoring train_loss instead of %s", name)
        name = "train_loss"
    elif names is not None and name.startswith("val_") and name[len("val_") :] not in names:
        allowed = ", ".join(f"val_{n}" for n in names)
        raise ValueError(
            f"monitor_metric={name!r} is invalid"
            + (f" for {task.value}" if task is not None else "")
            + f": expected one of {allowed}, or train_loss"
        )
    minimize = config.minimize_monitor if name == config.monitor_metric else True
    declared = _declared_direction(config, name, evaluator)
    return Monitor(name, minimize=minimize if declared is None else declared, min_delta=min_delta)


def _refuse_a_chosen_metric_without_validation(name: str, plan: ModePlan) -> None:
    """A validation metric other than the default `val_loss`, named for a run without a
    val_loader: refused, as in `stop_when` (early stopping and the best checkpoint would
    follow train_loss unsaid). The default falls back to train_loss."""
    default = TrainingConfig.__dataclass_fields__["monitor_metric"].default
    if name != default and plan.evaluate is None:
        raise ValueError(
            f"monitor_metric={name!r} is not measured in this run: it has no val_loader "
            "(pass one, or a config-file run's data.val_fraction > 0; or monitor train_loss)"
        )


def _declared_direction(
    config: TrainingConfig, name: str, evaluator: ModelEvaluator | None
) -> bool | None:
    """Whether the user's metric `name` (val_<name>) declares lower as better, when the
    config leaves the direction to the metric (monitor_mode auto)."""
    if config.monitor_mode != "auto" or evaluator is None or not name.startswith("val_"):
        return None
    return evaluator.minimizes(name[len("val_") :])


def check_stop_when(config: TrainingConfig, validates: bool, names: Sequence[str] | None) -> None:
    """Refuse a `stop_when` metric the run will not measure, before it starts: a validation
    metric of a run that does not validate (no val_loader, no validation of the mode's own),
    or one the task's validation does not produce (`names`, when known); train_loss is
    always measured."""
    for text in config.stop_when:
        metric = parse_condition(text).metric
        if metric == "train_loss":
            continue
        if not metric.startswith("val_") or not validates:
            raise ValueError(
                f"stop_when={text!r}: {metric!r} is not measured in this run (expected "
                "train_loss, or a validation metric val_<name> with a val_loader)"
            )
        if names is not None and metric[len("val_") :] not in names:
            allowed = ", ".join(f"val_{n}" for n in names)
            raise ValueError(f"stop_when={text!r}: expected one of {allowed}, or train_loss")


def validation_metric_names(
    evaluator: ModelEvaluator | None, task: TaskType, extra: Sequence[str] = ()
) -> list[str]:
    """The metrics a validation of `task` produces (each `val_<name>`): the loss, the
    evaluator's for the task, and a mode's `extra` ones."""
    return ["loss", *(evaluator or ModelEvaluator()).metric_names(task), *extra]


def check_resume_target(config: TrainingConfig, resume_from: Any) -> None:
    """resume_from="auto" without an output_dir would look in a folder made new for this
    run (runs/run-<time>), find nothing, and start fresh: refused before any folder."""
    if resume_from == "auto" and config.output_dir is None:
        raise ValueError(
            "resume_from='auto' (CLI: --resume auto) continues the run in output_dir, and "
            "output_dir is not set: each run gets a new runs/run-<time> folder, where there "
            "is nothing to resume; set output_dir (training.output_dir) to the run's folder"
        )


def load_resume(
    output_dir: Path,
    resume_from: str | Path | None,
    config: TrainingConfig,
    mode: Mode,
    job: Distributed,
    model: nn.Module,
) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: start fresh), refused if this config, job or
    `model` could not continue it exactly (before anything is written or said of it)."""
    if resume_from is None:
        return None
    found = find_checkpoint(output_dir, resume_from)
    if found is None:
        logger.info("no checkpoint to resume from in %s; starting fresh", output_dir)
        return None
    path, payload = found
    check_mode(payload, mode)  # first: a setting that shapes the model (ways) is named
    refuse_another_models(path, model.state_dict(), saved_weights(payload), ANOTHER_MODEL_ADVICE)
    check_compatible(
        payload["config"], config.to_dict(), payload.get("world_size", 1), job.world_size
    )
    strategy = config.distributed_strategy if job.enabled else None
    if payload.get("distributed_strategy") != strategy:
        raise ValueError(
            "cannot resume: the checkpoint was written with distributed_strategy="
            f"{payload.get('distributed_strategy')!r}, this run uses {strategy!r}"
        )
    if job.is_main:  # checkpoints of a later step belong to the part this resume abandons
        set_aside_later(output_dir / "checkpoints", path, payload["global_step"])
    logger.info("resuming from %s (step %d)", path, payload["global_step"])
    return payload


def place_model(
    model: nn.Module,
    config: TrainingConfig,
    plan: ModePlan,
    job: Distributed,
    device: torch.device,
    payload: dict[str, Any] | None,
) -> tuple[nn.Module, Any]:
    """Seed, move the model to its device with its resumed weights, freeze, and wrap it for
    data-parallel training. Returns the wrapped model and its `no_sync` (None if unwrapped)."""
    # Ranks draw different dropout masks, like one batch, unless the mode's ranks share one
    # stream (federated: a round's clients; reinforcement: each update's base seed).
    seed_everything(config.seed + (0 if plan.shared_seed else job.rank))
    model.to(device)
    if payload is not None and not in_shards(payload):  # sharded: with the optimizer
        model.load_state_dict(training_weights(payload))  # full, before any sharding
    if config.frozen_parameters:  # before DDP registers its gradient hooks
        frozen = freeze(model, config.frozen_parameters)
        logger.info("froze %d parameter tensors (%s)", frozen, ", ".join(config.frozen_parameters))
    # DDP wraps; FSDP shards `model` in place, so the optimizer is built after this.
    if plan.wraps_model:
        return wrap_model(model, device, job, config)
    job.broadcast_weights(model)  # the loop averages the gradients over the ranks itself
    return model, None


@dataclasses.dataclass
class Optimization:
    """What updates the weights: precision, optimizer, schedule, and the (compiled) module
    the steps call."""

    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    forward_model: nn.Module
    no_sync: Any  # DDP's: skip the gradient all-reduce inside a window (None: no DDP)


@dataclasses.dataclass
class Request:
    """What `TrainingManager.train` was asked: the caller's objects, as given."""

    model: nn.Module
    train_loader: Any
    val_loader: Any = None
    task_type: TaskType | None = None
    loss_function: Any = None
    evaluator: ModelEvaluator | None = None
    callbacks: Sequence[Any] = ()
    mode: Any = "supervised"
    resume_from: Any = None
    loggers: Sequence[Any] = ()
    output_transform: OutputTransform | None = None


@dataclasses.dataclass
class Assembly:
    """One run's parts, filled phase by phase by `TrainingManager`: the request, the mode
    and its plan (`plan_mode`), the monitor, the checkpoint resumed from, the optimization,
    and the checkpoints written (with their background writer, when async)."""

    request: Request
    mode: Mode
    loss: LossChoice
    plan: ModePlan
    precision: Precision
    data: Data
    monitor: Monitor | None = None
    payload: dict[str, Any] | None = None
    optimization: Optimization | None = None
    checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)
    writer: Any = None  # a CheckpointWriter with async_checkpointing


Builders = tuple[
    Callable[[nn.Module], torch.optim.Optimizer],
    Callable[[torch.optim.Optimizer, int | None], torch.optim.lr_scheduler.LRScheduler],
]


def optimization(
    run: Assembly,
    placed: tuple[nn.Module, Any],
    config: TrainingConfig,
    builders: Builders,
    *,
    schedule: bool = True,
) -> Optimization:
    """The optimizer (the mode's, e.g. federated's server, or the configured one), the
    schedule over the run's updates, their resumed states, and torch.compile. `placed`:
    the model as the steps call it (wrapped for DDP/FSDP) and DDP's `no_sync`; `builders`:
    the manager's optimizer and scheduler factories (which subclasses may override)."""
    model, plan, precision, payload = run.request.model, run.plan, run.precision, run.payload
    (wrapped, no_sync), (build_optimizer, build_scheduler) = placed, builders
    if plan.optimizer is not None:
        optimizer = plan.optimizer(model, build_optimizer)
    else:
        optimizer = build_optimizer(model)
    # A constant rate without warmup never changes: no scheduler (creating one would also
    # wrap optimizer.step in torch's step counter, work on every update).
    total = run.data.total_steps
    scheduler = None if constant_rate(config) or not schedule else build_scheduler(optimizer, total)
    if isinstance(scheduler, PlateauSchedule) and run.monitor is not None:
        scheduler.plateau.minimize = run.monitor.minimize  # e.g. a user metric's declared one
    if payload is not None:
        chosen = group_settings(optimizer)  # this run's rates and decay, not the checkpoint's
        restore_optimizer(model, optimizer, payload)
        if payload["scheduler"] is not None and scheduler is not None:
            restore_schedule(scheduler, payload["scheduler"])
        changed = changed_settings(payload["config"], config)  # (validated as a mapping)
        keep_chosen_settings(optimizer, scheduler, chosen, changed)
        if precision.scaler is not None and payload.get("scaler") is not None:
            precision.scaler.load_state_dict(payload["scaler"])
    forward_model: nn.Module = (
        torch.compile(wrapped, mode=config.compile_mode) if config.compile else wrapped  # type: ignore[assignment]
    )
    return Optimization(precision, optimizer, scheduler, forward_model, no_sync)


def update_rule(
    config: TrainingConfig, plan: ModePlan, parts: Optimization, model: nn.Module
) -> UpdateRule:
    """How the loop makes each update: the mode's step, the optimization, accumulation,
    clipping (unless the mode clips its own), non-finite steps, the moving average."""
    c = config
    average = WeightAverage(model, c.ema_decay, c.ema_warmup) if c.ema_decay else None
    attach = getattr(plan.step, "use_weight_average", None)  # Mean Teacher's teacher
    if callable(attach):
        attach(average)
    return UpdateRule(
        step_fn=plan.step,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        precision=parts.precision,
        accumulation_steps=c.gradient_accumulation_steps,
        max_grad_norm=c.max_grad_norm if c.gradient_clipping and plan.clips_gradients else None,
        skip_non_finite=c.skip_nonfinite_steps,
        weight_average=average,
    )


def placement(
    device: torch.device, parts: Optimization, plan: ModePlan, job: Distributed
) -> Placement:
    """Where the loop runs: the device, the module the steps call, the job; a mode whose
    model is not DDP-wrapped has its gradients averaged over the ranks by the loop."""
    return Placement(
        device,
        forward_model=parts.forward_model,
        job=job,
        no_sync=parts.no_sync,
        average_gradients=job.enabled and not plan.wraps_model,
    )


def run_length(config: TrainingConfig, data: Data, *, evaluating: bool) -> RunLength:
    """The run's epochs and updates, and how often it evaluates and logs."""
    return RunLength(
        num_epochs=config.num_epochs,
        updates_per_epoch=data.updates_per_epoch,
        max_steps=config.max_steps,
        eval_every_n_steps=config.eval_frequency if evaluating else None,
        log_every_n_steps=config.log_frequency,
        max_seconds=None if config.max_time is None else parse_duration(config.max_time),
    )


def constant_rate(config: TrainingConfig) -> bool:
    """Whether the learning rate never changes (no schedule needed)."""
    warmup = config.warmup_steps or config.warmup_ratio
    return config.scheduler_type == "constant" and not warmup


def evaluation(run: Assembly, device: torch.device, job: Distributed) -> EvaluateFn | None:
    """How the loop validates: the mode's own way, else the request's evaluator (or the
    default one) on this rank's validation share."""
    plan, precision, loss, mode = run.plan, run.precision, run.loss, run.mode
    request, val_loader = run.request, run.data.val_loader
    model, evaluator = request.model, request.evaluator
    task_type, output_transform = request.task_type, request.output_transform
    # Under DDP, evaluate the plain module: DDP's forward would broadcast buffers, a
    # collective that ranks with uneven evaluation shares would not all reach. An FSDP
    # module's forward is itself a collective: its ranks evaluate in lockstep.
    plain = model if job.enabled else None
    if plan.evaluate is not None:
        return _mode_evaluation(plan.evaluate, precision, plain)
    if val_loader is None:
        return None
    scorer = evaluator or ModelEvaluator()
    extra = _mode_evaluation(plan.extra_metrics, precision, plain) if plan.extra_metrics else None

    options: dict[str, Any] = {  # EvaluationOptions by keyword
        "training_mode": mode.evaluated_as,
        "precision": precision,
        "distributed": job,
        "lockstep": is_sharded(model),
        "output_transform": output_transform,
        "write_files": False,  # predictions and plots are for final evaluations
        "intervals": False,  # as bootstrap intervals are
    }

    def evaluate(m: nn.Module) -> dict[str, float]:
        # the specification's entry point: an Evaluator subclass that overrides it validates
        metrics = scorer.evaluate_model(
            plain if plain is not None else m,
            val_loader,
            device,
            loss.for_evaluation,
            task_type=task_type,
            **options,
        )
        return {**metrics, **extra(m)} if extra is not None else metrics

    return evaluate


def _mode_evaluation(evaluate: Any, precision: Precision, plain: nn.Module | None) -> EvaluateFn:
    """A mode's own validation, under the run's precision with the model in eval mode (the
    plain module under DDP, as for the Evaluator)."""

    def run(forward_model: nn.Module) -> dict[str, float]:
        model = plain if plain is not None else forward_model
        with in_eval_mode(model), precision.autocast():
            return dict(evaluate(model))

    return run


def open_loggers(
    config: TrainingConfig,
    run: Assembly,
    output_dir: Path,
    job: Distributed,
    run_config: dict[str, Any] | None = None,
) -> LoggerHub:
    """Rank 0 writes config.yaml (the whole `run_config` of a config-file run; else the
    training section and the mode, with its settings, of a run from Python: its data and
    model are the caller's objects) and metrics.jsonl (cut back to the resumed step) and
    opens the optional loggers and the user's; the other ranks log nothing."""
    mode, payload, hub = run.mode, run.payload, LoggerHub([])
    if job.is_main:  # config.yaml from the start: an interrupted run can be evaluated
        record = run_config or {"training": config.to_dict(), "mode": mode.to_dict()}
        write_run_config(record, output_dir)
        events, kept = output_dir / "metrics.jsonl", []
        if payload is not None:
            kept = truncate_events(events, payload["global_step"], logged_records(payload))
        else:
            events.unlink(missing_ok=True)
        resumed_step = payload["global_step"] if payload else 0
        optional = optional_loggers(config, output_dir, resumed_step, kept)
        hub = LoggerHub([JsonlLogger(events), *optional, *run.request.loggers])
        hub.records = len(kept)
    hub.log_config({**config.to_dict(), "mode": mode.to_dict()})
    return hub


def optional_loggers(
    config: TrainingConfig,
    output_dir: Path,
    resumed_step: int,
    kept: Sequence[dict[str, Any]] = (),
) -> list[Any]:
    """TensorBoard, W&B and MLflow when asked (and installed); a missing package or a
    service that fails warns (naming the extra) and never stops training. `kept`: the
    metrics.jsonl records a resume kept (TensorBoard gets those of the resumed step again,
    MLflow those its run lacks)."""
    c = config
    loggers: list[Any] = []
    if c.tensorboard_logging:
        try:
            from ..loggers.tensorboard import TensorBoardLogger

            purge = resumed_step if resumed_step else None
            replay = [r for r in kept if r.get("step") == resumed_step] if purge else []
            loggers.append(TensorBoardLogger(output_dir, purge_step=purge, replay=replay))
        except ImportError as error:
            logger.warning("%s; logging to metrics.jsonl only", error)
        except Exception as error:  # e.g. an unwritable folder: logging never stops training
            logger.warning("TensorBoard could not start (%s); logging to metrics.jsonl only", error)
    if c.wandb_logging:
        try:
            from ..loggers.wandb import WandbLogger

            loggers.append(WandbLogger(output_dir, project=c.wandb_project))
        except ImportError as error:
            logger.warning("%s; logging to metrics.jsonl only", error)
        except Exception as error:  # a logging service must not stop training
            logger.warning("W&B could not start (%s); logging to metrics.jsonl only", error)
    if c.mlflow_logging:
        from ..loggers.mlflow import mlflow_logger

        try:  # on a thread of its own: a slow or unreachable server never delays training
            loggers.append(mlflow_logger(output_dir, c.mlflow_tracking_uri, kept))
        except ImportError as error:
            logger.warning("%s; logging to metrics.jsonl only", error)
    return loggers
