"""One trial of a study: its place among the study's `--trials`, its run, what is recorded.

A study of N trials ends with exactly N finished trials (complete, pruned, or failed by their
own error), however many processes or machines run it. Each process asks the storage for a
trial; the storage numbers trials in the order they are created, and a trial runs only if
fewer than N trials ahead of it hold a place (finished, running or queued). Otherwise it is
recorded as surplus (left out of every table) and its process stops: no count is read and
then acted on, so two machines starting together cannot both take the last place.

A trial stopped by a signal is recorded as interrupted and a retry is queued that resumes its
run directory; so is a trial whose process vanished (found at the next start on this machine,
or by the storage's heartbeat from any machine).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..callbacks import Callback
from ..callbacks.base import Control
from ..commands.experiment import RunConfig, run_experiment
from ..training.loop import EvaluationError
from ..training.steplog import NonFiniteError
from ..training.stopping import TrainingInterrupted
from .space import run_data

logger = logging.getLogger(__name__)

ASK_LOCK = ".ask.lock"


class OptunaPruning(Callback):
    """Report the tuned metric to the trial at each validation; when the pruner says so,
    stop the run through the loop's request-stop path (its run directory stays whole)."""

    def __init__(self, trial: Any, metric: str, job: Any = None) -> None:
        """`trial` is None on the ranks other than 0 under torchrun; `job` (the run's
        `Distributed`) carries rank 0's decision to every rank, so all stop together."""
        self.trial, self.metric, self.job = trial, metric, job
        self.pruned_at: int | None = None

    def on_train_start(self, loop: Control) -> None:
        """A retry of an interrupted trial reports the values the trial had reported up to
        where its run resumes, and asks the pruner: a signal that came after the validation
        at which the pruner would have stopped the trial (the run saved after it) loses
        nothing."""
        reported = self.trial.user_attrs.get("reported") if self.trial is not None else None
        at = loop.state.global_step
        earlier = sorted(
            (int(step), float(value))
            for step, value in (reported.items() if isinstance(reported, dict) else [])
            if int(step) <= at
        )
        for step, value in earlier:
            self.trial.report(value, step)
        if self._decide(bool(earlier)):
            step, value = earlier[-1]
            self.pruned_at = step
            loop.request_stop(f"pruned by the study at step {step} ({self.metric} {value:.4g})")

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        value = logs.get(self.metric)
        if value is None:
            return
        step = loop.state.global_step
        if self.trial is not None:
            self.trial.report(float(value), step)
        if self._decide(self.trial is not None):
            self.pruned_at = step
            loop.request_stop(f"pruned by the study at step {step} ({self.metric} {value:.4g})")

    def _decide(self, ask: bool) -> bool:
        """The pruner's word (asked where `ask`), rank 0's on every rank."""
        prune = bool(self.trial.should_prune()) if ask and self.trial is not None else False
        if self.job is not None and self.job.enabled:
            prune = bool(self.job.gather(prune)[0])
        return prune


def _states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def is_finished(trial: Any) -> bool:
    """Whether `trial` counts towards `--trials`: complete, pruned, or failed by its own
    error (not interrupted, not surplus, not a process that died: those are retried)."""
    states = _states()
    return trial.state in (states.COMPLETE, states.PRUNED) or (
        trial.state == states.FAIL and "error" in trial.user_attrs
    )


def holds_place(trial: Any) -> bool:
    """Whether `trial` holds one of the study's places: finished, running or queued."""
    states = _states()
    if "surplus" in trial.user_attrs:
        return False
    return is_finished(trial) or trial.state in (states.RUNNING, states.WAITING)


def study_is_full(trials: Sequence[Any], total: int) -> bool:
    """Whether this process has nothing left to start: `total` trials finished, or every
    place taken by trials that others are running (and none queued)."""
    waiting = any(t.state == _states().WAITING for t in trials)
    return sum(map(is_finished, trials)) >= total or (
        sum(map(holds_place, trials)) >= total and not waiting
    )


def surplus(trial: Any, trials: Sequence[Any], total: int) -> str | None:
    """Why `trial` (just asked for) must not run, or None: `total` trials ahead of it hold
    a place, or it repeats the config as written that an earlier trial already runs."""
    ahead = [t for t in trials if t.number < trial.number]
    if sum(map(holds_place, ahead)) >= total:
        return f"the study already has its {total} trials"
    if trial.user_attrs.get("default") and any(t.user_attrs.get("default") for t in ahead):
        return "another process queued the config as written first"
    return None


def next_trial(study: Any, total: int, study_dir: str | Path) -> Any:
    """The next trial this process runs, or None when the study is full. Asks the storage
    (a queued retry first), and records a trial that finds no place as surplus. The asking
    holds `<study_dir>/.ask.lock`: SQLite ignores Optuna's row lock, so two processes could
    both pop one queued trial (measured: 5 races of 10 with two processes asking at once)."""
    from optuna.storages import _heartbeat  # Optuna's own, as `study.optimize` uses it

    with warnings.catch_warnings(), _asking(study_dir):  # "experimental"; "meant for
        warnings.simplefilter("ignore")  # Study.optimize": we run its loop, with its heartbeat
        if _heartbeat.is_heartbeat_enabled(study._storage):
            _heartbeat.fail_stale_trials(study)  # vanished trials of any machine: retried
        return _ask_for_a_place(study, total)


@contextlib.contextmanager
def _asking(study_dir: str | Path) -> Iterator[None]:
    """Hold `<study_dir>/.ask.lock` (a blocking POSIX lock; none where there is none)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(study_dir) / ASK_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _ask_for_a_place(study: Any, total: int) -> Any:
    while not study_is_full(study.get_trials(deepcopy=False), total):
        trial = study.ask()
        reason = surplus(trial, study.get_trials(deepcopy=False), total)
        if reason is None:
            _mark_mine(trial)  # whose it is, from the start
            return trial
        trial.set_user_attr("surplus", reason)
        study.tell(trial, state=_states().FAIL)
    return None


def _mark_mine(trial: Any) -> None:
    """Record whose `trial` is (host, process, PID namespace), so that a later start on
    this host can tell whether its process is gone (`gone_from_here`)."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_space", pid_space())


def mark_running(trial: Any, run_dir: Path) -> None:
    """Record where `trial` runs (its run directory; whose it is was recorded as it was
    asked for), so that a retry resumes it."""
    trial.set_user_attr("run_dir", str(run_dir))


def pid_space() -> str:
    """This process's PID namespace (containers sharing a host name have their own), or ''
    where the platform does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def gone_from_here(trial: Any) -> bool:
    """Whether `trial` was asked for by a process of this host (and PID namespace) that is
    gone (a trial that stopped before it had a run directory)."""
    pid, attrs = trial.user_attrs.get("pid"), trial.user_attrs
    if attrs.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if attrs.get("pid_space", "") != pid_space():  # another container's process
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def queue_retry(study: Any, trial: Any, why: str) -> bool:
    """Record the frozen `trial` as interrupted (`why`) and queue a retry with its
    parameters that resumes its run directory; False when the trial finished meanwhile
    (its process was only slow to answer): nothing to retry."""
    from optuna.exceptions import UpdateFinishedTrialError

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", why)
        if trial.state == _states().RUNNING:
            storage.set_trial_state_values(trial._trial_id, _states().FAIL)
    except UpdateFinishedTrialError:
        return False
    run_dir = trial.user_attrs.get("run_dir")
    attrs = {"retry_of": trial.number, **({"resume_dir": run_dir} if run_dir else {})}
    before = trial.user_attrs.get("seconds", trial.user_attrs.get("seconds_before"))
    if before is not None:  # the retry's seconds count what its run trained before
        attrs["seconds_before"] = before
    if trial.intermediate_values:  # the retry reports them again where its run resumes
        attrs["reported"] = {str(k): v for k, v in trial.intermediate_values.items()}
    study.enqueue_trial(trial.params, user_attrs=attrs)
    return True


def train_trial(
    number: int,
    values: Mapping[str, Any],
    resume_dir: str | None,
    settings: Any,
    trial: Any,
    job: Any = None,
) -> dict[str, Any]:
    """Train trial `number`: a traineval run in `<study_dir>/trial-<n>` (or the interrupted
    run it retries, resumed) with `values` set, pruned through `OptunaPruning` (`trial` is
    None on the ranks other than 0 under torchrun, `job` shares rank 0's decision). Returns
    `{"value", "pruned_at", "seconds"}`, or `{"error"}` for a run that diverged."""
    own = Path(settings.study_dir) / f"trial-{number:04d}"
    run_dir = Path(resume_dir) if resume_dir else own
    resumes = run_dir.is_dir() and run_dir != own  # not another machine's: not here
    run_dir = run_dir if resumes else own
    if trial is not None:
        mark_running(trial, run_dir)
        if resumes:
            logger.warning("trial %d resumes the interrupted run in %s", number, run_dir)
    data = run_data(settings.base, settings.written, values)
    data["training"]["output_dir"] = str(run_dir)
    pruning = OptunaPruning(trial, settings.metric, job)
    started = time.perf_counter()
    try:
        outcome = run_experiment(
            RunConfig.from_dict(data), resume_from="auto" if resumes else None, callbacks=[pruning]
        )
    except (NonFiniteError, EvaluationError) as error:  # the same on every rank
        if isinstance(error, EvaluationError) and error.user_code:  # a metric of theirs
            return {"error": str(error), "refused": error.reason}
        return {"error": str(error)}
    return {
        "value": outcome.training.best_metric,
        "pruned_at": pruning.pruned_at,
        "seconds": time.perf_counter() - started,
    }


def record(study: Any, trial: Any, outcome: Mapping[str, Any]) -> None:
    """Tell the study how `trial` ended (`train_trial`'s outcome); a trial another process
    already closed (its heartbeat judged this one gone, and queued a retry) is left so."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        _record(study, trial, outcome)
    except UpdateFinishedTrialError:
        logger.warning("trial %d was closed by another process meanwhile; its retry counts "
                       "instead", trial.number)  # fmt: skip


def _record(study: Any, trial: Any, outcome: Mapping[str, Any]) -> None:
    states = _states()
    if "error" in outcome:  # a diverging trial, or refused values: failed, the study goes on
        trial.set_user_attr("error", outcome["error"])
        logger.warning("trial %d failed: %s", trial.number, outcome["error"])
        study.tell(trial, state=states.FAIL)
        return
    trial.set_user_attr("seconds", outcome["seconds"] + trial.user_attrs.get("seconds_before", 0))
    if outcome["pruned_at"] is not None:
        study.tell(trial, state=states.PRUNED)
        logger.info("trial %d pruned at step %d", trial.number, outcome["pruned_at"])
    elif outcome["value"] is None:
        trial.set_user_attr("error", "the trial produced no value of the tuned metric")
        study.tell(trial, state=states.FAIL)
    else:
        study.tell(trial, float(outcome["value"]))
        logger.info("trial %d finished: %s", trial.number, _value_said(study, outcome["value"]))


def _value_said(study: Any, value: float) -> str:
    """A finished trial's value beside the study's best: "val_accuracy = 0.8696 (best:
    trial 3, 0.9130)"."""
    metric = study.user_attrs.get("metric", "value")
    best = study.best_trial
    return f"{metric} = {value:.4g} (best: trial {best.number}, {best.value:.4g})"


def record_interrupted(study: Any, trial: Any, why: str) -> None:
    """`trial` stopped on a signal: interrupted, with the seconds it ran (those of the runs
    it resumed too), and a retry queued that resumes it."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.datetime_start is not None and frozen.state == _states().RUNNING:
        ran = (datetime.datetime.now() - frozen.datetime_start).total_seconds()
        seconds = ran + frozen.user_attrs.get("seconds_before", 0)
        study._storage.set_trial_user_attr(trial._trial_id, "seconds", seconds)
        frozen = study._storage.get_trial(trial._trial_id)
    queue_retry(study, frozen, why)
    logger.info("trial %d stopped (%s); the next run of the study resumes it", trial.number, why)


def stopped_why(stopped: BaseException) -> str:
    """What stopped a trial, in words (a `TrainingInterrupted`, or a second signal)."""
    if isinstance(stopped, TrainingInterrupted):
        return stopped.what
    return str(stopped) or "interrupted"
