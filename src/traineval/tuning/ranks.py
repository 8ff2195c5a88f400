"""Trials under torchrun: rank 0 talks to the study, every rank trains each trial.

Rank 0 asks the study for a trial and sends its parameters to every rank (through the job's
gather, as the loop shares state); all ranks run the trial as one data-parallel
`run_experiment`; the pruning decision is rank 0's, shared at each validation so every rank
stops at the same step; rank 0 tells the study the result. A `None` order ends the study.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..distributed import setup
from ..experiment import RunConfig, run_experiment
from ..loop import EvaluationError
from ..rundir import run_dir_lock
from ..steplog import NonFiniteError
from .space import apply_values
from .study import (
    OptunaPruning,
    Settings,
    TuneResult,
    _optuna,
    _result,
    counted,
    enqueue_defaults,
    open_study,
    recover_abandoned,
)


def tune_on_ranks(settings: Settings, trials: int) -> TuneResult | None:
    """The study on rank 0, the trials on every rank; rank 0 returns the result."""
    training = settings.base["training"]
    job, _ = setup(
        training["device"], training["distributed_backend"], training["distributed_timeout_seconds"]
    )
    if not job.is_main:
        while (order := job.gather(None)[0]) is not None:
            _train(order, settings, job, None)
        return None
    with run_dir_lock(settings.study_dir):
        study = open_study(settings)
        if not study.get_trials(deepcopy=False):
            enqueue_defaults(study, settings)
        recover_abandoned(study, settings)
        while len(counted(study)) < trials:
            trial = study.ask()
            values = {p.field: p.suggest(trial) for p in settings.params}
            order = {"number": trial.number, "values": values,
                     "resume_dir": trial.user_attrs.get("resume_dir")}  # fmt: skip
            job.gather(order)
            _tell(study, trial, _train(order, settings, job, trial))
        job.gather(None)
        return _result(study, settings)


def _train(order: dict[str, Any], settings: Settings, job: Any, trial: Any) -> dict[str, Any]:
    """One trial on this rank; what rank 0 tells the study."""
    run_dir = Path(order["resume_dir"] or Path(settings.study_dir) / f"trial-{order['number']:04d}")
    if trial is not None:
        trial.set_user_attr("run_dir", str(run_dir))
    data = apply_values(settings.base, order["values"])
    data["training"]["output_dir"] = str(run_dir)
    pruning = OptunaPruning(trial, settings.metric, job)
    started = time.perf_counter()
    try:
        outcome = run_experiment(
            RunConfig.from_dict(data),
            resume_from="auto" if order["resume_dir"] else None,
            callbacks=[pruning],
        )
    except (NonFiniteError, EvaluationError) as error:  # the same on every rank
        return {"error": str(error)}
    return {
        "value": outcome.training.best_metric,
        "pruned": pruning.pruned_at is not None,
        "seconds": time.perf_counter() - started,
    }


def _tell(study: Any, trial: Any, outcome: dict[str, Any]) -> None:
    states = _optuna().trial.TrialState
    if "error" in outcome:
        trial.set_user_attr("error", outcome["error"])
        study.tell(trial, state=states.FAIL)
        return
    trial.set_user_attr("seconds", outcome["seconds"])
    if outcome["pruned"]:
        study.tell(trial, state=states.PRUNED)
    elif outcome["value"] is None:
        trial.set_user_attr("error", "the trial produced no value of the tuned metric")
        study.tell(trial, state=states.FAIL)
    else:
        study.tell(trial, float(outcome["value"]))
