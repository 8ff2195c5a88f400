"""Trials under torchrun: rank 0 talks to the study, every rank trains each trial.

Rank 0 asks the study for a trial and sends its parameters to every rank (through the job's
gather, as the loop shares state); all ranks run the trial as one data-parallel
`run_experiment`; the pruning decision is rank 0's, shared at each validation so every rank
stops at the same step; rank 0 tells the study the result. A `None` order ends the study.
"""

from __future__ import annotations

from ..runs.rundir import run_dir_lock
from ..system.distributed import setup
from ..training.stopping import TrainingInterrupted
from .study import Settings, TuneResult, result, start_study
from .trial import next_trial, record, record_interrupted, stopped_why, train_trial


def tune_on_ranks(settings: Settings, trials: int) -> TuneResult | None:
    """The study on rank 0, the trials on every rank; rank 0 returns the result."""
    training = settings.base["training"]
    job, _ = setup(
        training["device"], training["distributed_backend"], training["distributed_timeout_seconds"]
    )
    if not job.is_main:
        while (order := job.gather(None)[0]) is not None:
            train_trial(**order, settings=settings, trial=None, job=job)
        return None
    with run_dir_lock(settings.study_dir):
        study = start_study(settings)
        while (trial := next_trial(study, trials, settings.study_dir)) is not None:
            values = {p.field: p.tidy(p.suggest(trial)) for p in settings.params}
            order = {"number": trial.number, "values": values,
                     "resume_dir": trial.user_attrs.get("resume_dir")}  # fmt: skip
            job.gather(order)
            try:
                outcome = train_trial(**order, settings=settings, trial=trial, job=job)
            except (TrainingInterrupted, KeyboardInterrupt) as stopped:
                record_interrupted(study, trial, stopped_why(stopped))
                raise
            record(study, trial, outcome)
        job.gather(None)
        return result(study, settings)
