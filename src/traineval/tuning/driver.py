"""`traineval.tune`: check everything, then run the study's trials in this process, in
worker processes, or data-parallel on the ranks of a torchrun job."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..commands.experiment import RunConfig
from ..runs.rundir import run_dir_lock
from ..training.exit_codes import BAD_INPUT
from ..training.stopping import TrainingInterrupted, watching_signals
from .ranks import tune_on_ranks
from .study import (
    Settings,
    TuneOptions,
    TuneResult,
    finished_count,
    prepare,
    result,
    start_study,
    within_the_grid,
)
from .worker import wait_for_earlier_workers, work, worker_main


def tune(
    config: RunConfig | str | Path,
    search: Mapping[str, Any] | None = None,
    *,
    trials: int = 20,
    metric: str | None = None,
    direction: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    storage: str | None = None,
    study_name: str | None = None,
    study_dir: str | Path | None = None,
    workers: int = 1,
    seed: int | None = 0,
) -> TuneResult | None:
    """Search `search` (see `traineval.tuning.space`) over `config` (a RunConfig, or a YAML
    file whose `search:` section is the space) until the study holds `trials` finished
    trials (counting earlier runs of it); returns the best.

    `metric` defaults to the config's `monitor_metric` and `direction` ("minimize" /
    "maximize") to its monitor's; `sampler` is "tpe", "random" or "grid", each trial
    sampling with its own seed derived from `seed` and its number; `pruner` "median",
    "halving" (successive halving) or "none". The study is stored at `storage` (an Optuna
    storage URL; default SQLite in `study_dir`, which defaults to `training.output_dir` or
    `runs/study-<time>-<hex>`); calling again continues it, resuming interrupted trials.
    `workers` > 1 runs that many processes on the study. Under torchrun every rank trains
    each trial data-parallel and rank 0 talks to the study (it alone returns the result;
    the others None). Writes `best_config.yaml`, a config that `traineval fit` runs as is.
    Raises `TrainingInterrupted` when a signal stopped the study (run it again to go on).
    """
    options = TuneOptions(trials, metric, direction, sampler, pruner, storage, study_name,
                          study_dir, workers, seed)  # fmt: skip
    settings = prepare(config, search, options)
    trials = within_the_grid(settings, trials)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return tune_on_ranks(settings, trials)  # None on the ranks other than 0
    return tune_locally(settings, trials, workers)


def tune_locally(settings: Settings, trials: int, workers: int) -> TuneResult:
    """The study's trials in this process, or in `workers` processes (see `tune`)."""
    with run_dir_lock(settings.study_dir):  # one `tune` driver per study directory
        wait_for_earlier_workers(settings.study_dir)  # a killed driver's, stopping
        study = start_study(settings)
        if workers == 1:
            work(study, settings, trials)
        elif finished_count(study) < trials:
            run_workers(settings, trials, workers, study)
        return result(study, settings)


def run_workers(settings: Settings, trials: int, workers: int, study: Any) -> None:
    """`workers` spawned processes on the study until it is full. A signal to this driver
    stops them (each saves its trial); a worker that died is reported in one line."""
    context = multiprocessing.get_context("spawn")
    # the workers stop when this end closes: on a signal, or as this process dies (a pipe,
    # not an Event: a killed driver's semaphores were reported leaked at its exit)
    stop, stopping = context.Pipe(duplex=False)
    processes = [
        context.Process(target=worker_main, args=(settings, trials, os.getpid(), stop))
        for _ in range(workers)
    ]
    with watching_signals(lambda name: stopping.close()) as watch:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    stopping.close()
    if watch.received is not None:
        what = f"tune interrupted by {watch.received}"
        raise TrainingInterrupted(what, None, watch.received, what)
    refused = [p.pid for p in processes if p.exitcode == BAD_INPUT]
    if refused:
        raise ValueError(
            f"tune worker(s) {', '.join(map(str, refused))} stopped the study on bad input "
            "(their line above says what): fix it, then run the same command again (the "
            "trials the other workers stopped resume)"
        )
    _report_lost_workers(processes, study, settings, trials)


def _report_lost_workers(processes: list[Any], study: Any, settings: Settings, total: int) -> None:
    """One line for workers that died or failed: which trials resume, and what to do."""
    from .study import recover_abandoned

    lost = [p for p in processes if p.exitcode]
    if not lost:
        return
    resumed = recover_abandoned(study, settings)
    how = [
        f"pid {p.pid} killed by {signal.Signals(-p.exitcode).name}"
        if p.exitcode < 0
        else f"pid {p.pid} exited with status {p.exitcode}"
        for p in lost
    ]
    queued = ""
    if resumed:
        queued = f"; trial {', '.join(map(str, resumed))} will resume from its run directory"
    raise WorkerLost(
        f"{len(lost)} tune worker(s) stopped ({'; '.join(how)}) with "
        f"{finished_count(study)} of {total} trials finished{queued}: run the same command "
        "again to finish the study"
    )


class WorkerLost(ChildProcessError):
    """A worker process of the study died or failed (the message says what to do); an
    OSError without a file, so its exit status is a fault's (`exit_codes`)."""
