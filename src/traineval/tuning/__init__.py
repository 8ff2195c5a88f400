"""Hyperparameter search on Optuna: `traineval tune CONFIG --trials N`, `traineval.tune(...)`.

Each trial is a normal traineval run in `<study_dir>/trial-<n>/` (config.yaml, metrics.jsonl,
checkpoints), pruned through the loop's request-stop path; the study lives in Optuna's own
storage (SQLite in the study directory by default), so it can be continued after a crash and
shared by several worker processes or machines.
"""

from .driver import tune
from .space import Param, parse_space
from .study import TuneResult

__all__ = ["Param", "TuneResult", "parse_space", "tune"]
