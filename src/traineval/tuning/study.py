"""Running a study: trials as traineval runs, pruning through a callback, Optuna's storage.

`tune(config, search, trials=20)` creates (or continues) the study in `<study_dir>/study.db`
and runs trials until `trials` of them have finished (complete, pruned, or failed by their
own error). A trial whose process died (kill -9, a lost machine) is found on the next start
(its run directory is no longer locked; on other machines Optuna's heartbeat notices) and
is marked failed and retried: the retry resumes the same run directory from its last
checkpoint, so the interrupted trial's work is not lost.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..build import validation_metric_names
from ..callbacks import Callback
from ..callbacks.base import Control
from ..config import metric_is_minimized
from ..evaluation import Evaluator
from ..experiment import RunConfig, run_experiment, run_parts
from ..loop import EvaluationError
from ..modes import MetaLearning, Reinforcement
from ..rundir import RunDirInUse, atomic_write_text, default_run_dir, run_dir_lock
from ..steplog import NonFiniteError
from .space import Param, apply_values, check_values, parse_space

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
STUDY_FILE = "study.db"
HEARTBEAT = {"heartbeat_interval": 10, "grace_period": 30}  # seconds; for remote workers


@dataclasses.dataclass
class TuneResult:
    """A finished study: where it lives, its best trial and every trial's record."""

    study_dir: Path
    storage: str
    study_name: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    best_config: Path
    trials: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every worker needs to run trials of one study (plain values: picklable)."""

    base: dict[str, Any]
    params: tuple[Param, ...]
    metric: str
    direction: str
    study_dir: str
    storage: str
    study_name: str
    sampler: str
    pruner: str
    seed: int | None


class OptunaPruning(Callback):
    """Report the tuned metric to the trial at each validation; when the pruner says so,
    stop the run through the loop's request-stop path (its run directory stays whole)."""

    def __init__(self, trial: Any, metric: str, job: Any = None) -> None:
        """`trial` is None on the ranks other than 0 under torchrun; `job` (the run's
        `Distributed`) carries rank 0's decision to every rank, so all stop together."""
        self.trial, self.metric, self.job = trial, metric, job
        self.pruned_at: int | None = None

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        value = logs.get(self.metric)
        if value is None:
            return
        step = loop.state.global_step
        prune = False
        if self.trial is not None:
            self.trial.report(float(value), step)
            prune = bool(self.trial.should_prune())
        if self.job is not None and self.job.enabled:
            prune = bool(self.job.gather(prune)[0])  # rank 0's word, on every rank
        if prune:
            self.pruned_at = step
            loop.request_stop(f"pruned by the study at step {step} ({self.metric} {value:.4g})")


def start_study(settings: Settings) -> Any:
    """The study ready for trials: opened (created on first use, its first trial the config
    as written), and every abandoned trial queued for a retry that resumes it."""
    study = open_study(settings)
    if not study.get_trials(deepcopy=False):
        enqueue_defaults(study, settings)
    recover_abandoned(study, settings)
    return study


def tune_locally(settings: Settings, trials: int, workers: int) -> TuneResult:
    """The study's trials in this process, or in `workers` processes (see `tune`)."""
    with run_dir_lock(settings.study_dir):  # one `tune` driver per study directory
        study = start_study(settings)
        remaining = trials - len(counted(study))
        if remaining > 0:
            _run_workers(settings, remaining, workers, study)
        return _result(study, settings)


def prepare(
    config: RunConfig | str | Path,
    search: Mapping[str, Any] | None,
    trials: int,
    metric: str | None,
    direction: str | None,
    sampler: str,
    pruner: str,
    storage: str | None,
    study_name: str | None,
    study_dir: str | Path | None,
    workers: int,
    seed: int | None,
) -> Settings:
    """Check every argument and the search space against the config, before any trial."""
    _optuna()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and workers != 1:
        raise ValueError(
            f"workers={workers} is invalid under torchrun: every rank trains each trial "
            "(rank 0 talks to the study); start several torchrun jobs on one storage instead"
        )
    if not isinstance(config, RunConfig):
        config, search = load_tune_config(config, search)
    for name, value, allowed in (("sampler", sampler, SAMPLERS), ("pruner", pruner, PRUNERS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(allowed)}")
    for count_name, count in (("trials", trials), ("workers", workers)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{count_name}={count!r} is invalid: expected an integer >= 1")
    metric = metric or config.training.monitor_metric
    minimize = (
        config.training.minimize_monitor
        if metric == config.training.monitor_metric
        else metric_is_minimized(metric)
    )
    direction = direction or ("minimize" if minimize else "maximize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r} is invalid: expected 'minimize' or 'maximize'")
    base = config.to_dict()
    base["training"]["monitor_metric"] = metric
    base["training"]["monitor_mode"] = "min" if direction == "minimize" else "max"
    params = parse_space(search, base)
    check_values(params, base, RunConfig.from_dict)
    _check_metric(RunConfig.from_dict(base), metric)
    if sampler == "grid":
        for param in params:
            param.grid()
    folder = Path(study_dir or config.training.output_dir or default_run_dir("study"))
    folder.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    return Settings(base, tuple(params), metric, direction, str(folder), url,
                    study_name or folder.name, sampler, pruner, seed)  # fmt: skip


def load_tune_config(
    path: str | Path, search: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> tuple[RunConfig, Any]:
    """A YAML run config with a `search:` section (the space, unless `search` is given),
    with dotted `key=value` overrides applied to the run config."""
    from ..config import load_yaml

    data = load_yaml(path)
    section = data.pop("search", None)
    return RunConfig.from_data(data, overrides), search if search is not None else section


def _check_metric(config: RunConfig, metric: str) -> None:
    """A metric the trials would not produce is refused before the first trial."""
    if isinstance(config.mode, (Reinforcement, MetaLearning)) or not metric.startswith("val_"):
        return  # their metrics come from the mode: the first trial's start checks them
    parts = run_parts(config)
    task = parts.task_type
    if task is None:
        return
    names = validation_metric_names(Evaluator(config.evaluation), task)
    if metric.removeprefix("val_") not in names:
        raise ValueError(
            f"metric={metric!r} is not produced by this run ({task.value}): expected "
            f"one of {', '.join('val_' + n for n in names)}"
        )
    if parts.splits.val is None:
        raise ValueError(f"metric={metric!r} needs a validation split: set data.val_fraction > 0")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError("traineval tune needs Optuna: pip install 'traineval[tune]'") from None
    return optuna


def open_study(settings: Settings) -> Any:
    """The study in its storage, created on first use (Optuna's storage, not ours)."""
    optuna = _optuna()
    try:
        storage = _storage(settings.storage)
        return optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=_sampler(settings),
            pruner=_pruner(settings.pruner),
            direction=settings.direction,
            load_if_exists=True,
        )
    except ValueError as error:
        raise ValueError(f"study {settings.study_name!r} in {settings.storage}: {error}") from None
    except Exception as error:  # an unreachable database, a bad URL: say which
        raise ValueError(
            f"storage={settings.storage!r} cannot be opened ({type(error).__name__}: {error})"
        ) from None


def _storage(url: str) -> Any:
    optuna = _optuna()
    if url.startswith("journal:") or url.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, **HEARTBEAT)


def _sampler(settings: Settings) -> Any:
    optuna = _optuna()
    if settings.sampler == "grid":
        space = {p.field: p.grid() for p in settings.params}
        return optuna.samplers.GridSampler(space, seed=settings.seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def _pruner(name: str) -> Any:
    optuna = _optuna()
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2)


def enqueue_defaults(study: Any, settings: Settings) -> None:
    """A new study's first trial is the config as written (when its values lie in the
    space), so the search never returns a configuration worse than the one it started from."""
    values: dict[str, Any] = {}
    for param in settings.params:
        node: Any = settings.base
        for key in param.field.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        inside = (
            node in param.choices
            if param.choices is not None
            else isinstance(node, (int, float))
            and param.low is not None
            and param.high is not None
            and param.low <= node <= param.high
        )
        if not inside or (settings.sampler == "grid" and node not in param.grid()):
            return
        values[param.field] = node
    study.enqueue_trial(values, user_attrs={"default": True})


def counted(study: Any) -> list[Any]:
    """The trials that count towards `trials`: complete, pruned, or failed by their own
    error (not a trial whose process died: that one is retried)."""
    states = _optuna().trial.TrialState
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (states.COMPLETE, states.PRUNED)
        or (t.state == states.FAIL and "error" in t.user_attrs)
    ]


def recover_abandoned(study: Any, settings: Settings) -> None:
    """Mark failed each running trial whose run directory nobody holds (its process died),
    and queue a retry that resumes that run directory."""
    states = _optuna().trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        if not run_dir or not Path(run_dir).is_dir():
            continue  # another machine's trial: Optuna's heartbeat looks after it
        try:
            with run_dir_lock(run_dir):
                pass
        except RunDirInUse:
            continue  # still running
        study._storage.set_trial_state_values(trial._trial_id, states.FAIL)
        study.enqueue_trial(
            trial.params, user_attrs={"resume_dir": run_dir, "retry_of": trial.number}
        )
        logger.warning(
            "trial %d was interrupted (its process is gone): marked failed; its retry resumes %s",
            trial.number,
            run_dir,
        )


def _run_workers(settings: Settings, remaining: int, workers: int, study: Any) -> None:
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    shares = [s for s in shares if s]
    if len(shares) == 1:  # in this process, on the study already open
        study.optimize(lambda trial: run_trial(trial, settings), n_trials=shares[0])
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=optimize, args=(settings, s)) for s in shares]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} tune worker(s) failed (exit codes {failed})")


def optimize(settings: Settings, n_trials: int) -> None:
    """One worker: `n_trials` trials of the study (a process of its own when workers > 1)."""
    study = open_study(settings)
    study.optimize(lambda trial: run_trial(trial, settings), n_trials=n_trials)


def run_trial(trial: Any, settings: Settings) -> float:
    """One trial of `study.optimize` (see `train_trial`); returns its best tuned metric."""
    values = {p.field: p.suggest(trial) for p in settings.params}
    outcome = train_trial(trial.number, values, trial.user_attrs.get("resume_dir"), settings, trial)
    if "error" in outcome:  # a diverging trial: failed, the study goes on
        trial.set_user_attr("error", outcome["error"])
        logger.warning("trial %d failed: %s", trial.number, outcome["error"])
        return float("nan")  # Optuna records a NaN objective as a failed trial
    trial.set_user_attr("seconds", outcome["seconds"])
    if outcome["pruned_at"] is not None:
        raise _optuna().TrialPruned(f"pruned at step {outcome['pruned_at']}")
    if outcome["value"] is None:
        raise ValueError(f"trial {trial.number} produced no {settings.metric}")
    return float(outcome["value"])


def train_trial(
    number: int,
    values: Mapping[str, Any],
    resume_dir: str | None,
    settings: Settings,
    trial: Any,
    job: Any = None,
) -> dict[str, Any]:
    """Train trial `number`: a traineval run in `<study_dir>/trial-<n>` (or the interrupted
    run it retries, resumed) with `values` set, pruned through `OptunaPruning` (`trial` is
    None on the ranks other than 0 under torchrun, `job` shares rank 0's decision). Returns
    `{"value", "pruned_at", "seconds"}`, or `{"error"}` for a run that diverged."""
    run_dir = Path(resume_dir or Path(settings.study_dir) / f"trial-{number:04d}")
    if trial is not None:
        trial.set_user_attr("run_dir", str(run_dir))
    data = apply_values(settings.base, values)
    data["training"]["output_dir"] = str(run_dir)
    pruning = OptunaPruning(trial, settings.metric, job)
    started = time.perf_counter()
    try:
        outcome = run_experiment(
            RunConfig.from_dict(data),
            resume_from="auto" if resume_dir else None,
            callbacks=[pruning],
        )
    except (NonFiniteError, EvaluationError) as error:  # the same on every rank
        return {"error": str(error)}
    return {
        "value": outcome.training.best_metric,
        "pruned_at": pruning.pruned_at,
        "seconds": time.perf_counter() - started,
    }


def _result(study: Any, settings: Settings) -> TuneResult:
    complete = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.value is not None and t.state.name == "COMPLETE"
    ]
    if not complete:
        raise ValueError(f"no trial of study {settings.study_name!r} completed; see its trials")
    best = study.best_trial
    data = apply_values(settings.base, best.params)
    data["training"]["output_dir"] = None  # `traineval fit best_config.yaml` picks a new one
    path = Path(settings.study_dir) / "best_config.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return TuneResult(
        study_dir=Path(settings.study_dir),
        storage=settings.storage,
        study_name=settings.study_name,
        best_number=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        best_config=path,
        trials=[trial_record(t) for t in study.get_trials(deepcopy=False)],
    )


def trial_record(trial: Any) -> dict[str, Any]:
    """A trial as plain values: number, state, value, params, seconds, run directory."""
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": dict(trial.params),
        "seconds": trial.user_attrs.get("seconds"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "error": trial.user_attrs.get("error"),
    }
