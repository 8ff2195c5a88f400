"""Where the modules of the flat layout (every module at the top of the package) went when
they moved into wings, and an importer that keeps the old paths working for one more minor
release: `import traineval.loop` gives `traineval.training.loop` itself (the same module
object, so `mock.patch("traineval.loop.x")` patches the real one), with a FutureWarning that
names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

REMOVED_IN = "0.3"

MOVED: dict[str, str] = {
    "traineval.seeding": "traineval.system.seeding",
    "traineval.cpu_threads": "traineval.system.cpu_threads",
    "traineval.requirements": "traineval.system.requirements",
    "traineval.version": "traineval.system.version",
    "traineval.untrusted_text": "traineval.system.untrusted_text",
    "traineval.csv_cells": "traineval.system.csv_cells",
    "traineval.distributed": "traineval.system.distributed",
    "traineval.checks": "traineval.config.checks",
    "traineval.registry": "traineval.config.registry",
    "traineval.imports": "traineval.config.code_references",
    "traineval.augment": "traineval.data.augment",
    "traineval.rundir": "traineval.runs.rundir",
    "traineval.checkpoint": "traineval.runs.checkpoint",
    "traineval.checkpoint_writer": "traineval.runs.checkpoint_writer",
    "traineval.resume": "traineval.runs.resume",
    "traineval.tracking": "traineval.runs.tracking",
    "traineval.train_state": "traineval.runs.train_state",
    "traineval.loop": "traineval.training.loop",
    "traineval.batches": "traineval.training.batches",
    "traineval.steps": "traineval.training.steps",
    "traineval.optim": "traineval.training.optim",
    "traineval.precision": "traineval.training.precision",
    "traineval.averaging": "traineval.training.averaging",
    "traineval.monitor": "traineval.training.monitor",
    "traineval.stopping": "traineval.training.stopping",
    "traineval.steplog": "traineval.training.steplog",
    "traineval.run_checkpoints": "traineval.training.run_checkpoints",
    "traineval.lr_finder": "traineval.training.lr_finder",
    "traineval.exit_codes": "traineval.training.exit_codes",
    "traineval.envs": "traineval.modes.envs",
    "traineval.build": "traineval.assembly.build",
    "traineval.manager": "traineval.assembly.manager",
    "traineval.experiment": "traineval.commands.experiment",
    "traineval.predict": "traineval.commands.predict",
    "traineval.evaluation.cross_validation": "traineval.assembly.cross_validation",
    "traineval.evaluation.evaluator": "traineval.assembly.evaluator",
    "traineval.reporting.report": "traineval.commands.report",
    "traineval.config_docs": "traineval.commands.config_docs",
    "traineval.flower": "traineval.federated.flower",
    "traineval.flower_app": "traineval.federated.flower_app",
    "traineval.flower_controls": "traineval.federated.flower_controls",
    "traineval.reporting.study_report": "traineval.tuning.report",
}


# Names that moved to a module of a higher wing than their old one: the old module answers
# for them through its `__getattr__`, with the same warning.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "traineval.system.distributed": {
        "shard_train_loader": "traineval.data.sharding",
        "shard_eval_loader": "traineval.data.sharding",
        "ShardSampler": "traineval.data.sharding",
    },
    "traineval.evaluation": {"Evaluator": "traineval.assembly.evaluator"},
}


def moved_name(module: str, name: str) -> Any:
    """`module.name` where `name` moved (see `MOVED_NAMES`), with a FutureWarning; an
    AttributeError for any other missing name."""
    new = MOVED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {new}.{name}; import it from there (the old place goes in "
        f"traineval {REMOVED_IN})",
        FutureWarning,
        stacklevel=3,
    )
    value = getattr(importlib.import_module(new), name)
    setattr(sys.modules[module], name, value)  # warned once; then found directly
    return value


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path in `MOVED` and loads it as the module that lives at the new one."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path goes in "
            f"traineval {REMOVED_IN})",
            FutureWarning,
            stacklevel=2,  # the import system's own frames are skipped: the importing line
        )
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system gave the module the old path's spec: give it back its own.
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)  # type: ignore[union-attr]


def install() -> None:
    """Put the old-path importer after the standard finders (once per process)."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())
