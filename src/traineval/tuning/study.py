"""Running a study: trials as traineval runs, pruning through a callback, Optuna's storage.

`tune(config, search, trials=20)` creates (or continues) the study in `<study_dir>/study.db`
(or any Optuna storage) and runs trials until `trials` of them have finished (see `trial`
for how the count stays exact across processes and machines). A trial whose process died
(kill -9, a lost machine) is found on the next start (its run directory is no longer
locked; on other machines Optuna's heartbeat notices) and retried: the retry resumes the
same run directory from its last checkpoint, so the interrupted trial's work is not lost.
Each trial samples with its own seed, derived from the study's seed and the trial's number,
so workers and continuations never draw the same sequence.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..assembly.build import validation_metric_names
from ..assembly.evaluator import Evaluator
from ..commands.experiment import RunConfig, run_parts
from ..config.checks import fail, field_default, integer
from ..config.config_file import run_config_text
from ..config.training_config import (
    RUN_ONLY_FIELDS,
    current_metric_name,
    known_direction,
    metric_is_minimized,
)
from ..models import MODELS, option_default
from ..runs.rundir import RunDirInUse, default_run_dir, run_dir_lock
from ..system.files import atomic_write_text
from .choices import PRUNERS, SAMPLERS
from .space import Param, check_values, parse_space, run_data
from .trial import gone_from_here, is_finished, queue_retry

logger = logging.getLogger(__name__)

WORKERS_PER_CORE = 4  # the most tune workers per CPU core
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
    # the training fields a trial's config writes (the config's given ones and the study's
    # monitor), so that a default stays a default there (see `run_data`)
    written: tuple[str, ...] = ()


def start_study(settings: Settings) -> Any:
    """The study ready for trials: opened (created on first use, its first trial the config
    as written), and every abandoned trial queued for a retry that resumes it."""
    study = open_study(settings)
    _check_objective(study, settings)
    _check_same_runs(study, settings)
    if not study.get_trials(deepcopy=False):
        logger.info("study %r created", settings.study_name)
        enqueue_defaults(study, settings)
    else:
        finished = finished_count(study)
        logger.info(
            "study %r continues after its %d finished trial%s",
            settings.study_name,
            finished,
            "" if finished == 1 else "s",
        )
    recover_abandoned(study, settings)
    return study


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """How a study runs (`traineval.tune`'s keyword arguments, which say what each means);
    checked by `prepare`, with the config and the search space."""

    trials: int = 20
    metric: str | None = None
    direction: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    study_name: str | None = None
    study_dir: str | Path | None = None
    workers: int = 1
    seed: int | None = 0


def prepare(
    config: RunConfig | str | Path, search: Mapping[str, Any] | None, options: TuneOptions
) -> Settings:
    """Check every option and the search space against the config, before any trial."""
    _optuna()
    o = options
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and o.workers != 1:
        raise ValueError(
            f"workers={o.workers} is invalid under torchrun: every rank trains each trial "
            "(rank 0 talks to the study); start several torchrun jobs on one storage instead"
        )
    if not isinstance(config, RunConfig):
        config, search = load_tune_config(config, search)
    for name, value, allowed in (("sampler", o.sampler, SAMPLERS), ("pruner", o.pruner, PRUNERS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(allowed)}")
    integer("trials", o.trials, minimum=1)
    _check_workers(o.workers)
    metric = current_metric_name(o.metric) or config.training.monitor_metric
    if not isinstance(metric, str) or not re.fullmatch(r"val_\w+|train_loss", metric):
        raise ValueError(
            f"metric={metric!r} is invalid: expected 'val_<metric>' (e.g. 'val_accuracy', "
            "'val_loss') or 'train_loss'"
        )
    direction = o.direction or ("minimize" if _minimizes(config, metric) else "maximize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r} is invalid: expected 'minimize' or 'maximize'")
    if known_direction(metric) not in (None, direction == "minimize"):
        better, way = ("lower", "minimize") if direction == "maximize" else ("higher", "maximize")
        raise ValueError(
            f"direction={direction!r} is invalid: {metric} is better when {better}; "
            f"use {way!r}, or leave direction out"
        )
    base = config.to_dict()
    base["training"]["monitor_metric"] = metric
    base["training"]["monitor_mode"] = "min" if direction == "minimize" else "max"
    params = parse_space(search, base)
    check_values(params, base, RunConfig.from_dict)
    _check_metric(RunConfig.from_dict(base), metric)
    if o.sampler == "grid":
        for param in params:
            param.grid()
    folder = Path(o.study_dir or config.training.output_dir or default_run_dir("study"))
    if (folder / "summary.json").is_file() or (folder / "checkpoints").is_dir():
        raise ValueError(
            f"output_dir={str(folder)!r} holds a training run (its summary.json or "
            "checkpoints): a study needs a folder of its own (its trials, study.db and "
            "best_config.yaml would be mixed into the run's); give another output_dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    url = o.storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    written = (*config.training.given_dict(), "monitor_metric", "monitor_mode")
    return Settings(base, tuple(params), metric, direction, str(folder), url,
                    o.study_name or folder.name, o.sampler, o.pruner, o.seed, written)  # fmt: skip


def load_tune_config(
    path: str | Path, search: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> tuple[RunConfig, Any]:
    """A YAML run config with a `search:` section (the space, unless `search` is given),
    with dotted `key=value` overrides applied to the run config."""
    from ..config.training_config import load_yaml

    data = load_yaml(path)
    section = data.pop("search", None)
    return RunConfig.from_data(data, overrides), search if search is not None else section


def _minimizes(config: RunConfig, metric: str) -> bool:
    """The study's direction for `metric`: the config's monitor_mode when it is the monitored
    metric and set, else the direction a user's metric declares, else its name's."""
    training = config.training
    if metric == training.monitor_metric and training.monitor_mode != "auto":
        return training.minimize_monitor
    declared = Evaluator(config.evaluation).minimizes(metric.removeprefix("val_"))
    return metric_is_minimized(metric) if declared is None else declared


def _check_metric(config: RunConfig, metric: str) -> None:
    """A metric the trials would not produce is refused before the first trial."""
    if config.mode.own_metrics or not metric.startswith("val_"):
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
    quiet = optuna.logging.get_verbosity()  # its "A new study created" line: ours says it
    optuna.logging.set_verbosity(max(quiet, optuna.logging.WARNING))
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
            f"storage={settings.storage!r} cannot be opened "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None
    finally:
        optuna.logging.set_verbosity(quiet)


def _check_objective(study: Any, settings: Settings) -> None:
    """A study continues under the metric and direction it began with: another one would
    rank values of two quantities together (losses beside accuracies). The first run
    records them in the study; a study of an earlier version is read by its direction."""
    known = study.user_attrs.get("metric")
    direction = study.direction.name.lower()
    if (known or settings.metric, direction) != (settings.metric, settings.direction):
        raise ValueError(
            f"study {settings.study_name!r} optimises {known or 'its metric'} ({direction}); "
            f"this run asks for {settings.metric} ({settings.direction}): pass --metric "
            f"{known or '...'} --direction {direction} to continue it, or start another "
            "study (--study-name, or another output_dir)"
        )
    if known is None:
        study.set_user_attr("metric", settings.metric)


# what may differ between the runs of one study: how a run is shown, logged, written, where
# it runs (on another machine too); every other field must be as it began
MAY_DIFFER = (
    *(f"training.{name}" for name in RUN_ONLY_FIELDS),
    "data.num_workers",
    "evaluation.output_dir",
)


def _check_same_runs(study: Any, settings: Settings) -> None:
    """A study continues with the config and search space it began with: trials of another
    config ranked beside its own would make a false best (and `best_config.yaml`, the base
    with the best values, would not be the config that trained it). The first run records
    both in the study (the fields set away from their defaults: a later version's new field
    at its default is no change); a study of an earlier version records them now. A data
    file is compared by its name (machines sharing a study keep it in other folders)."""
    import json

    defaults = _section_defaults(settings.base)
    flat = json.loads(json.dumps(_flat(settings.base), default=repr))
    base = {
        k: Path(v).name if k == "data.path" and isinstance(v, str) else v
        for k, v in flat.items()
        if k not in MAY_DIFFER and defaults.get(k, _UNSET) != v
    }
    space = {p.field: p.describe() for p in settings.params}
    now = json.loads(json.dumps({"base": base, "space": space}, default=repr))
    known = study.user_attrs.get("runs")
    if known is None:
        study.set_user_attr("runs", now)
        return
    changed = [f"search.{k}" for k in sorted({*known["space"], *now["space"]})
               if known["space"].get(k) != now["space"].get(k)]  # fmt: skip
    changed += [k for k in sorted({*known["base"], *now["base"]})
                if known["base"].get(k, defaults.get(k)) != now["base"].get(k, defaults.get(k))
                and k not in MAY_DIFFER]  # fmt: skip
    if changed:
        raise ValueError(
            f"study {settings.study_name!r} was begun with another config: "
            f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} differ ("
            f"{_was(changed[0], known, defaults)}); set them back to continue it, or start "
            "another study (--study-name, or another output_dir)"
        )


def _was(key: str, known: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """What the study began with for `key` (a field, or `search.<field>`), in words."""
    field = key.removeprefix("search.")
    if key != field:
        said = known["space"].get(field)
        return f"{key} was {said!r}" if said is not None else f"{field} was not searched"
    if field in known["base"]:
        return f"{key} was {known['base'][field]!r}"
    default = defaults.get(field, _UNSET)
    return f"{key} was {default!r}" if default is not _UNSET else f"{key} was not set"


_UNSET = object()


def _section_defaults(base: Mapping[str, Any]) -> dict[str, Any]:
    """Each config field's default by dotted name (`training.learning_rate`), a built-in
    model's options' too (`model.options.dropout`), as JSON."""
    import json

    from ..commands.experiment import _SECTIONS

    defaults: dict[str, Any] = {}
    options = base.get("model", {}).get("options") or {}
    for option in options if isinstance(options, Mapping) else ():
        defaults[f"model.options.{option}"] = _model_option_default(base, str(option))
    for section, cls in _SECTIONS.items():
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = field_default(field)
            if value is not dataclasses.MISSING:
                defaults[f"{section}.{field.name}"] = value
    return json.loads(json.dumps(defaults, default=repr))


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`data`'s leaves by dotted name (`training.learning_rate`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_workers(workers: Any) -> None:
    """At least one worker, and at most WORKERS_PER_CORE per CPU core: each is a process
    that trains, and 100,000 of them would exhaust the machine before the first trial."""
    integer("workers", workers, minimum=1)
    cores = os.cpu_count() or 1
    if workers > WORKERS_PER_CORE * cores:
        fail("workers", workers, f"expected an integer in [1, {WORKERS_PER_CORE * cores}] "
             f"({WORKERS_PER_CORE} per CPU core; this machine has {cores}): each worker is a "
             "process training its own trials")  # fmt: skip


def _storage(url: str) -> Any:
    optuna = _optuna()
    if url.startswith("journal:") or url.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        parameters = inspect.signature(optuna.storages.RDBStorage).parameters
        stale = (  # renamed in Optuna 4.9
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in parameters
            else "failed_trial_callback"
        )
        for attempt in range(3):  # processes creating a new database's tables at once race
            try:
                return optuna.storages.RDBStorage(url, **HEARTBEAT, **{stale: _retry_stale})
            except Exception as error:
                if attempt == 2 or type(error).__name__ not in (
                    "IntegrityError",
                    "ProgrammingError",
                ):
                    raise
                time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _retry_stale(study: Any, trial: Any) -> None:
    """Optuna's heartbeat found `trial`'s process gone (on any machine): retry it."""
    queue_retry(study, trial, "interrupted: its process stopped answering")
    logger.warning("trial %d stopped answering (its machine or process is gone): queued to "
                   "resume", trial.number)  # fmt: skip


def _sampler(settings: Settings) -> Any:
    optuna = _optuna()

    def build(seed: int | None) -> Any:
        if settings.sampler == "grid":
            space = {p.field: p.grid() for p in settings.params}
            return optuna.samplers.GridSampler(space, seed=seed)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    return seeded_per_trial(build, settings.seed)


def seeded_per_trial(build: Callable[[int | None], Any], seed: int | None) -> Any:
    """A sampler that builds its inner sampler (`build(seed)`) afresh for each trial, seeded
    from `seed` and the trial's number. The storage hands each number out once, so no two
    workers, machines or continuations draw the same random sequence, and a seeded random
    study draws the same trials however many workers ran it."""
    base: Any = _optuna().samplers.BaseSampler

    class TrialSeeded(base):
        def __init__(self) -> None:
            self.inner = build(seed)

        def before_trial(self, study: Any, trial: Any) -> None:
            self.inner = build(None if seed is None else trial_seed(seed, trial.number))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, space: Any) -> Any:
            return self.inner.sample_relative(study, trial, space)

        def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
            return self.inner.sample_independent(study, trial, name, dist)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            try:
                self.inner.after_trial(study, trial, state, values)
            except RuntimeError as error:  # the grid, done, calls study.stop(): the trial
                if "Study.stop" not in str(error):  # count (`within_the_grid`) ends it
                    raise

    return TrialSeeded()


def within_the_grid(settings: Settings, trials: int) -> int:
    """The grid sampler runs each combination once: a study asked for more trials than the
    grid holds runs that many, said once (Optuna's grid sampler stops a study only from
    inside `optimize`, and then samples the grid again)."""
    if settings.sampler != "grid":
        return trials
    size = math.prod(len(param.grid()) for param in settings.params)
    if trials > size:
        logger.warning(
            "the grid holds %d combination%s: the study runs %d trials, not %d",
            size,
            "" if size == 1 else "s",
            size,
            trials,
        )
    return min(trials, size)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` in a study seeded `seed`."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _pruner(name: str) -> Any:
    optuna = _optuna()
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2)


def enqueue_defaults(study: Any, settings: Settings) -> None:
    """A new study's first trial is the config as written (when its values lie in the
    space), so the search never returns a configuration worse than the one it started from;
    when one lies outside, say so."""
    values: dict[str, Any] = {}
    for param in settings.params:
        node: Any = settings.base
        for key in param.field.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None and param.field.startswith("model.options."):  # left at its default
            node = _model_option_default(settings.base, param.field.split(".")[2])
        if not param.holds(node, grid=settings.sampler == "grid"):
            logger.warning(
                "trial 0 is not the config as written: %s=%r lies outside the search space "
                "(%s); every trial is sampled",
                param.field,
                node,
                param.describe(),
            )
            return
        values[param.field] = node
    study.enqueue_trial(values, user_attrs={"default": True})


def _model_option_default(base: Mapping[str, Any], option: str) -> Any:
    """A built-in model's default for `option` (None for a factory of yours)."""
    name = base.get("model", {}).get("name")
    return option_default(name, option) if name in MODELS else None


def finished_count(study: Any) -> int:
    """How many trials count towards `--trials` (see `trial.is_finished`)."""
    return sum(map(is_finished, study.get_trials(deepcopy=False)))


def recover_abandoned(study: Any, settings: Settings) -> list[int]:
    """Retry each running trial of this machine whose process is gone (nobody holds its
    run directory); returns their numbers. Other machines' trials are the heartbeat's."""
    states = _optuna().trial.TrialState
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        if not run_dir and gone_from_here(trial):  # it stopped before its run started
            if queue_retry(study, trial, "interrupted: its process is gone"):
                retried.append(trial.number)
            continue
        if not run_dir or not Path(run_dir).is_dir():
            continue  # another machine's trial: Optuna's heartbeat looks after it
        try:
            with run_dir_lock(run_dir):
                pass
        except RunDirInUse:
            continue  # still running
        if not queue_retry(study, trial, "interrupted: its process is gone"):
            continue  # it finished as we looked
        logger.warning("trial %d was interrupted (its process is gone): its retry resumes %s",
                       trial.number, run_dir)  # fmt: skip
        retried.append(trial.number)
    return retried


def result(study: Any, settings: Settings) -> TuneResult:
    """The study's outcome; writes `best_config.yaml`, the best trial's config as is."""
    records = trial_records(study, settings.params)
    if not any(r["state"] == "complete" and r["value"] is not None for r in records):
        raise ValueError(f"no trial of study {settings.study_name!r} completed; see its trials")
    best = study.best_trial
    params = tidy(best.params, settings.params)
    data = run_data(settings.base, settings.written, params)
    data["training"]["output_dir"] = None  # `traineval fit best_config.yaml` picks a new one
    path = Path(settings.study_dir) / "best_config.yaml"
    atomic_write_text(path, run_config_text(data))
    return TuneResult(
        study_dir=Path(settings.study_dir),
        storage=settings.storage,
        study_name=settings.study_name,
        best_number=best.number,
        best_value=float(best.value),
        best_params=params,
        best_config=path,
        trials=records,
    )


def tidy(values: Mapping[str, Any], params: Sequence[Param] = ()) -> dict[str, Any]:
    """`values` as the user would write them (a stepped 0.30000000000000004 is 0.3)."""
    by_field = {p.field: p for p in params}
    return {k: by_field[k].tidy(v) if k in by_field else v for k, v in values.items()}


def trial_records(study: Any, params: Sequence[Param] = ()) -> list[dict[str, Any]]:
    """Every trial of the study as plain values (surplus trials, never run, left out)."""
    trials = study.get_trials(deepcopy=False)
    return [trial_record(t, params) for t in trials if "surplus" not in t.user_attrs]


def trial_record(trial: Any, params: Sequence[Param] = ()) -> dict[str, Any]:
    """A trial as plain values: number, state (`interrupted` for a trial stopped on a
    signal or whose process died, `queued` for its retry before it runs, with the values
    it will run), value, params, seconds, run directory, error."""
    attrs = trial.user_attrs
    state = "interrupted" if "interrupted" in attrs else trial.state.name.lower()
    values = trial.params or (getattr(trial, "system_attrs", {}).get("fixed_params") or {})
    return {
        "number": trial.number,
        "state": "queued" if state == "waiting" else state,  # a retry, not run yet
        "value": trial.value,
        "params": tidy(values, params),
        "seconds": attrs.get("seconds"),
        "run_dir": attrs.get("run_dir"),
        "error": attrs.get("error") or attrs.get("interrupted") or attrs.get("crashed"),
        "resumes": attrs.get("retry_of"),
    }
