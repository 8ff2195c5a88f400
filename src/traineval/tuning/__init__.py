"""Hyperparameter search on Optuna: `traineval tune CONFIG --trials N`, `traineval.tune(...)`.

Each trial is a normal traineval run in `<study_dir>/trial-<n>/` (config.yaml, metrics.jsonl,
checkpoints), pruned through the loop's request-stop path; the study lives in Optuna's own
storage (SQLite in the study directory by default), so it can be continued after a crash and
shared by several worker processes or machines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Param", "TuneResult", "parse_space", "tune"]

_PUBLIC = {"tune": "driver", "Param": "space", "parse_space": "space", "TuneResult": "study"}

if TYPE_CHECKING:
    from .driver import tune
    from .space import Param, parse_space
    from .study import TuneResult


def __getattr__(name: str) -> Any:
    # imported when first used: `traineval --help` builds the tune command's options from
    # this package without loading the study's machinery (torch, Optuna)
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
