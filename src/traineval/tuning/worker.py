"""One process's share of a study: trials until the study is full, stopping cleanly.

`work` runs in the driver (one worker) or in each spawned worker process. It watches for
SIGTERM and SIGINT for its whole life: a signal during a trial stops that run at its next
consistent point (it saves `last.pt`), the trial is recorded as interrupted with a retry
queued, and the process stops; a signal between trials stops it before the next one. A
spawned worker also stops (as on SIGTERM) when its driver stops it or dies, even by kill -9,
and holds the study's worker lock while it lives, so a new driver waits for it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..runs.rundir import RunDirInUse
from ..training.exit_codes import BAD_INPUT, error_line, exit_status_of
from ..training.stopping import TrainingInterrupted, exit_status, received, watching_signals
from .study import Settings, open_study
from .trial import next_trial, record, record_interrupted, stopped_why, train_trial

logger = logging.getLogger(__name__)

WORKERS_LOCK = ".workers.lock"
# a study stops when this many trials in a row had their values refused the same way (a
# mistake in the config, not in a value): the trials after them would fail too
REFUSED_IN_A_ROW = 3


def work(study: Any, settings: Settings, total: int) -> None:
    """Run trials of `study` until it is full (see `trial.next_trial`); raises
    `TrainingInterrupted` when a signal stopped this process."""
    in_a_row: list[str] = []  # why the last trials' values were refused, if they were
    with watching_signals():
        while True:
            name = received()
            if name is not None:
                what = f"tune interrupted by {name} between trials"
                raise TrainingInterrupted(what, None, name, what)
            trial = next_trial(study, total, settings.study_dir)
            if trial is None:
                return
            refused = run(study, trial, settings)
            in_a_row = [*in_a_row, refused] if refused else []
            if len(in_a_row) >= REFUSED_IN_A_ROW and len(set(in_a_row)) == 1:
                raise ValueError(
                    f"{len(in_a_row)} trials in a row failed the same way: {refused}; fix "
                    "it, then run the tune again (it continues the study)"
                )


def run(study: Any, trial: Any, settings: Settings) -> str | None:
    """Train `trial` and record how it ended; returns why its values were refused (bad
    input: a model factory or a config check refused them; the trial failed and the study
    goes on), else None. A signal records it as interrupted (its retry queued) and stops
    this process; a fault of the machine records it as crashed and stops it too."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            values = {p.field: p.tidy(p.suggest(trial)) for p in settings.params}
            resume_dir = trial.user_attrs.get("resume_dir")
            outcome = train_trial(trial.number, values, resume_dir, settings, trial)
        except (TrainingInterrupted, KeyboardInterrupt) as stopped:
            raise _trial_interrupted(study, trial, stopped) from stopped
        except Exception as error:
            if exit_status_of(error) != BAD_INPUT:
                _crashed(study, trial, error)
                raise
            said = error_line(error)
            outcome = {"error": said, "refused": said}
        except BaseException as error:
            _crashed(study, trial, error)
            raise
    record(study, trial, outcome)
    return outcome.get("refused")  # why, without where: the same for the same mistake


def _crashed(study: Any, trial: Any, error: BaseException) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("crashed", f"{type(error).__name__}: {error}")
    study.tell(trial, state=TrialState.FAIL)


def _trial_interrupted(study: Any, trial: Any, stopped: BaseException) -> TrainingInterrupted:
    """Record `trial` as interrupted (its retry queued); the error that stops the study."""
    why = stopped_why(stopped)
    record_interrupted(study, trial, why)
    run_dir = trial.user_attrs.get("run_dir") or "its run directory"
    what = f"tune interrupted: trial {trial.number} stopped ({why}); it resumes from {run_dir}"
    name = getattr(stopped, "signal_name", "SIGINT")
    return TrainingInterrupted(what, getattr(stopped, "checkpoint", None), name, what)


def worker_main(settings: Settings, total: int, parent: int, stop: Any) -> None:
    """A spawned worker: trials until the study is full; exits 128+N when a signal (or
    its driver's stop, or its driver's death) stopped it, 2 (bad input: its trials were
    refused, as the other workers' will be) or 1 with one line on an error."""
    # quiet as the driver's trials: warnings only (no epoch lines, see `progress.say`)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with watching_signals(), WorkersLock(settings.study_dir, shared=True):
        _watch_driver(parent, stop)
        try:
            work(open_study(settings), settings, total)
        except TrainingInterrupted as stopped:
            sys.exit(exit_status(stopped.signal_name))
        except KeyboardInterrupt:
            sys.exit(exit_status("SIGINT"))
        except Exception as error:
            print(f"traineval: tune worker {os.getpid()}: error: {error}", file=sys.stderr)
            sys.exit(exit_status_of(error))  # 2: the driver says the study stopped on it


def _watch_driver(parent: int, stop: Any) -> None:
    """Stop this worker as SIGTERM would once the driver `parent` closes its end of the
    pipe `stop` or is gone (its parent changes when it dies), unless a signal already
    reached it."""

    def watch() -> None:
        while os.getppid() == parent and not stop.poll(0.2):  # closed: poll answers True
            pass
        if received() is None:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="traineval-driver-watch", daemon=True).start()


class WorkersLock:
    """`<study_dir>/.workers.lock`: shared by the living workers, exclusive for a driver
    checking that no worker of an earlier driver still runs (POSIX locks; none without)."""

    def __init__(self, study_dir: str, *, shared: bool) -> None:
        self.path, self.shared, self.fd = Path(study_dir) / WORKERS_LOCK, shared, -1

    def __enter__(self) -> WorkersLock:
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise RunDirInUse(f"{self.path} is held by the workers of another tune") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def wait_for_earlier_workers(study_dir: str, seconds: float = 120.0) -> None:
    """Wait until no worker of an earlier driver of this study runs (they stop on their
    own once their driver is gone, after saving their trials); refuse after `seconds`."""
    import time

    deadline, told = time.monotonic() + seconds, False
    while True:
        try:
            with WorkersLock(study_dir, shared=False):
                return
        except RunDirInUse:
            if time.monotonic() > deadline:
                raise RunDirInUse(
                    f"study_dir={study_dir!r}: workers of an earlier `traineval tune` of this "
                    f"study still run after {seconds:.0f} s: stop them, then run the command again"
                ) from None
            if not told:
                logger.warning("waiting for the workers of an earlier tune of this study to stop")
                told = True
            time.sleep(0.25)
