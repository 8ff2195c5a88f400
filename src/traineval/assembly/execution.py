"""The last phase of `TrainingManager.train`: the run's files at its start, the loop over the
assembled parts, signals, the last checkpoint write, summary.json and the loggers' close.

It works on the manager's parts through `Runner` (what it needs of the manager), so the
manager stays the specification's facade and this module the one place a run is driven.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..callbacks import Callback
from ..config.training_config import TrainingConfig
from ..loggers import JsonlLogger, LoggerHub
from ..modes import Mode
from ..runs.checkpoint_writer import CheckpointWriter, StagedWrites
from ..runs.tracking import MetricsTracker
from ..system.distributed import Distributed
from ..system.files import atomic_write_json, json_records, read_json_or_none
from ..system.seeding import data_generators, deterministic_algorithms
from ..training.exit_codes import error_line
from ..training.loop import EvaluateFn, Loop, Monitor, Observers, TrainState
from ..training.monitor import PerformanceMonitor
from ..training.run_checkpoints import (
    background_writer,
    check_callback_states,
    put_back_best,
    restore_best,
    restore_loop,
    restore_weights,
    shard_writer,
    shards_for,
    writes_in_background,
)
from ..training.steplog import NonFiniteError
from ..training.stopping import TrainingInterrupted, watching_signals
from . import build
from .results import TrainingResult

logger = logging.getLogger("traineval.assembly.manager")


class Runner(Protocol):
    """What driving a run needs of `TrainingManager`."""

    config: TrainingConfig
    distributed: Distributed
    device: torch.device
    output_dir: Path
    run_config: dict[str, Any] | None
    run_files: dict[str, Any]
    metrics_tracker: MetricsTracker
    performance_monitor: PerformanceMonitor
    early_stopping_counter: int

    def optimization(self, run: build.Assembly, *, schedule: bool = True) -> build.Optimization: ...

    def _default_callbacks(self) -> list[Callback]: ...

    def _save_from_loop(
        self, name: str, loop: Loop, mode: Mode, writer: CheckpointWriter | None = None
    ) -> Path: ...

    def _result(
        self, state: TrainState, monitor_name: str, seconds: float, checkpoints: dict[str, str]
    ) -> TrainingResult: ...


def execute(manager: Runner, run: build.Assembly) -> TrainingResult:
    """Assemble the loop's parts around the planned run (resumed from its payload) and
    run it."""
    c, job = manager.config, manager.distributed
    run.optimization = manager.optimization(run)
    evaluate_fn = build.evaluation(run, manager.device, job)
    hub = build.open_loggers(c, run, manager.output_dir, job, manager.run_config)
    if run.plan.record and job.is_main:  # what the mode made of the data (mode.json)
        atomic_write_json(manager.output_dir / "mode.json", run.plan.record)
    for name, record in manager.run_files.items():  # e.g. a table's data.json, with config.yaml
        if job.is_main:
            atomic_write_json(manager.output_dir / name, record)
    sharded = shards_for(c, job, run.request.model)
    background = writes_in_background(c, manager.device, run.request.model, sharded)
    if background and sharded:  # every rank writes its part
        run.writer = shard_writer(c, job)
    elif background and job.is_main:  # rank 0 writes (the others only gather)
        run.writer = background_writer(c.checkpoint_writer, manager.device)
    try:
        loop = _loop(manager, run, evaluate_fn, hub)
        check_callback_states(loop)  # before any work, not at the first save
        if run.payload is not None:
            restore_loop(loop, run.payload)
            if job.is_main:  # not the best of a max_steps stop's closing evaluation
                put_back_best(manager.output_dir / "checkpoints")
    except BaseException:  # nothing trained: what was opened for the run closes
        try:
            if run.writer is not None:
                run.writer.close()
        finally:
            hub.close()
        raise
    return _run(manager, run, loop, hub)


FINISHED_NOTICE = (
    "the run in %s already finished (step %d); nothing to resume (%s to train it further)"
)


def already_finished(
    manager: Runner, model: nn.Module, payload: dict[str, Any], monitor: Monitor
) -> TrainingResult:
    """The result of a resume of a run that had finished: its weights into `model`, its
    record, nothing trained."""
    loop = payload["loop"]
    further = "raise num_epochs or max_steps"
    if loop["stopped_early"] and (loop.get("stop_reason") or "").startswith("early stopping"):
        further = "raise early_stopping_patience"
    elif loop["stopped_early"]:
        further = f"its stop ({loop.get('stop_reason')}) still holds; change it"
    logger.warning(  # a notice, seen also with -q: nothing was trained
        FINISHED_NOTICE,
        manager.output_dir,
        payload["global_step"],
        further,
    )
    restore_weights(model, payload, kept=True)  # as the run ended: the average, with one
    if manager.config.restore_best_weights:  # or its best weights, which it ended with
        restore_best(model, payload)
    state = TrainState()
    state.load_state_dict(payload["loop"])
    result = manager._result(state, monitor.name, 0.0, saved_checkpoints(manager.output_dir))
    earlier = read_json_or_none(manager.output_dir / "summary.json")
    if earlier is not None and earlier.get("global_step") == state.global_step:
        # the run's own record (its time, checkpoints), marked finished again where a
        # signal had stopped its test phase
        result.train_seconds = earlier.get("train_seconds", 0.0)
        result.performance = earlier.get("performance", {})
        result.checkpoints = earlier.get("checkpoints", {})
        result.updates_trained = earlier.get("updates_trained", 0)
    if manager.distributed.is_main and state.best_metric is not None:
        _log_the_best_once(manager.output_dir / "metrics.jsonl", state)
    result.write_summary(manager.distributed)
    result.updates_trained = 0  # this call trained nothing (the record keeps the run's)
    return result


def saved_checkpoints(output_dir: Path) -> dict[str, str]:
    """The checkpoint files in a run's folder, by name ("best", "last", "epoch-0003")."""
    return {p.stem: str(p) for p in sorted((output_dir / "checkpoints").glob("*.pt"))}


def _log_the_best_once(events: Path, state: TrainState) -> None:
    """The run's closing `best` record, where a signal in its last evaluation stopped it
    before the record was logged (the resume finds the run finished)."""
    if not events.exists():
        return
    last = next(iter(deque((record for _, record in json_records(events)), maxlen=1)), {})
    if last.get("event") == "best" or last.get("split") == "test":  # logged, or tested after it
        return
    log = JsonlLogger(events)
    log.log({"event": "best", "best_metric": state.best_metric}, state.global_step)
    log.close()


def _loop(
    manager: Runner, run: build.Assembly, evaluate_fn: EvaluateFn | None, hub: LoggerHub
) -> Loop:
    """The loop over the assembled parts, with the default callbacks before the user's;
    its saves are recorded in `run.checkpoints` (and written by `run.writer`, when
    async)."""
    c, job, model, data = manager.config, manager.distributed, run.request.model, run.data
    parts, plan, writer = run.optimization, run.plan, run.writer
    assert parts is not None
    assert run.monitor is not None

    def save_fn(name: str, loop: Loop, staged: StagedWrites | None = None) -> Path:
        if staged is not None:
            staged.target = writer  # its saves are written by the background writer
        path = manager._save_from_loop(name, loop, run.mode, staged or writer)
        run.checkpoints[name] = str(path)
        return path

    return Loop(
        model=model,
        train_loader=data.batches,
        update=build.update_rule(c, plan, parts, model),
        length=build.run_length(c, data, evaluating=evaluate_fn is not None),
        placement=build.placement(manager.device, parts, plan, job),
        monitor=run.monitor,
        evaluate_fn=evaluate_fn,
        save_fn=save_fn,
        observers=Observers(
            callbacks=[*manager._default_callbacks(), *run.request.callbacks],
            loggers=hub,
            tracker=manager.metrics_tracker,
            performance=manager.performance_monitor,
            layer_norms=c.log_layer_grad_norms,
        ),
        data_generators=data_generators(data.batches),  # federated: none (rounds reseed)
    )


def _run(manager: Runner, run: build.Assembly, loop: Loop, hub: LoggerHub) -> TrainingResult:
    """Run the loop (deterministic if asked, stopping cleanly on signals); wait for the
    last checkpoint write; write summary.json; close the loggers."""
    monitor, checkpoints, writer = run.monitor, run.checkpoints, run.writer
    assert monitor is not None
    started = time.perf_counter()
    resumed_at = (run.payload or {}).get("global_step", 0)
    if run.payload is not None:  # the run's files from before the resume point are its own
        for name, path in saved_checkpoints(manager.output_dir).items():
            checkpoints.setdefault(name, path)
    try:
        try:
            with (
                deterministic_algorithms(manager.config.deterministic),
                watching_signals(loop.stops.signalled),
            ):
                state = loop.run()
            _count_every_rank(manager.performance_monitor, manager.distributed)
        except Exception as error:  # summary.json says the run did not finish, and why
            if writer is not None:
                writer.wait()
            status = "interrupted" if isinstance(error, TrainingInterrupted) else "failed"
            seconds = time.perf_counter() - started
            ended = manager._result(loop.state, monitor.name, seconds, checkpoints)
            if loop.in_epoch:  # one that failed at its first batch is not a whole epoch
                ended.epochs_completed = loop.state.epoch - 1
            if isinstance(error, NonFiniteError) and error.step is not None:
                ended.trained_until(error.step)
            ended.updates_trained = ended.global_step - resumed_at
            ended.write_summary(
                manager.distributed,
                status,
                error_line(error)
                if status == "interrupted"
                else f"{type(error).__name__}: {error_line(error)}",
            )
            raise
        if writer is not None:
            writer.wait()  # success is reported once the last checkpoint is on disk
        if state.best_metric is not None:
            hub.log({"event": "best", "best_metric": state.best_metric}, state.global_step)
        manager.early_stopping_counter = monitor.num_bad
        result = manager._result(state, monitor.name, time.perf_counter() - started, checkpoints)
        result.updates_trained = state.global_step - resumed_at
        result.write_summary(manager.distributed)
    finally:
        try:
            if writer is not None:  # also when the run failed: its checkpoint lands first
                writer.close()  # (and a writer process ends)
        finally:
            hub.close()  # after summary.json, so artifact loggers take it along
    return result


def _count_every_rank(monitor: PerformanceMonitor, job: Distributed) -> None:
    """The samples every rank trained on, as metrics.jsonl's records count them (each rank's
    monitor counts its own; summary.json had rank 0's share), summed where every rank has
    just finished training, before any work one rank alone does (a background checkpoint's
    last write). A run that failed keeps this rank's: a rank that died would not answer."""
    if job.enabled:
        monitor.total_samples = int(job.sum([monitor.total_samples])[0])
