"""`traineval.tune`: check everything, then run the study's trials in this process, in
worker processes, or data-parallel on the ranks of a torchrun job."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..experiment import RunConfig
from .ranks import tune_on_ranks
from .study import TuneResult, prepare, tune_locally


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
    file whose `search:` section is the space) for `trials` trials; returns the best.

    `metric` defaults to the config's `monitor_metric` and `direction` ("minimize" /
    "maximize") to its monitor's; `sampler` is "tpe" (seeded by `seed`), "random" or "grid";
    `pruner` "median", "halving" (successive halving) or "none". The study is stored at
    `storage` (an Optuna storage URL; default SQLite in `study_dir`, which defaults to
    `training.output_dir` or `runs/study-<time>-<hex>`); calling again continues it.
    `workers` > 1 runs that many processes on the study. Under torchrun every rank trains
    each trial data-parallel and rank 0 talks to the study (it alone returns the result;
    the others None). Writes `best_config.yaml`, a config that `traineval fit` runs as is.
    """
    settings = prepare(config, search, trials, metric, direction, sampler, pruner, storage,
                       study_name, study_dir, workers, seed)  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return tune_on_ranks(settings, trials)  # None on the ranks other than 0
    return tune_locally(settings, trials, workers)
