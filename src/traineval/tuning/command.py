"""`traineval tune CONFIG --trials N`: the command line of the study (parser, run, tables)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .choices import PRUNERS, SAMPLERS


def add_parser(commands: Any) -> None:
    """Add `tune` to the `traineval` subcommands."""
    tune = commands.add_parser(
        "tune",
        help="hyperparameter search on Optuna over a config's `search:` section",
        description="Run Optuna trials over the fields named in CONFIG's `search:` section "
        "(e.g. learning_rate: {low: 1e-4, high: 1e-1, log: true}; batch_size: [16, 32, 64]). "
        "Each trial is a run in STUDY_DIR/trial-<n>/ (STUDY_DIR: training.output_dir); the "
        "study is kept in STUDY_DIR/study.db (or --storage), so running the same command again "
        "continues it. Prints the trials and writes STUDY_DIR/best_config.yaml, which "
        "`traineval fit` runs as is.",
    )
    tune.add_argument("config", type=Path, help="YAML file with the run config and `search:`")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    tune.add_argument("--trials", type=int, default=20, help="trials to finish (default 20)")
    tune.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    tune.add_argument("--metric", help="the metric to optimise (default monitor_metric)")
    tune.add_argument("--direction", choices=("minimize", "maximize"), help="default: metric's")
    tune.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="default tpe")
    tune.add_argument("--pruner", choices=PRUNERS, default="median", help="default median")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    tune.add_argument("--storage", help="an Optuna storage URL (default sqlite in STUDY_DIR)")
    tune.add_argument("--study-name", help="the study's name (default STUDY_DIR's name)")
    tune.add_argument("-q", "--quiet", action="store_true", help="only print the final table")


def run(args: argparse.Namespace, failures: tuple[type[BaseException], ...]) -> int:
    """Run the study the arguments describe; print its trials and its best config."""
    import optuna

    from ..config.code_references import add_search_path
    from ..training.stopping import TrainingInterrupted
    from .driver import WorkerLost, tune
    from .study import load_tune_config

    if args.quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        add_search_path(args.config.parent)  # my_pkg beside the config imports
        config, search = load_tune_config(args.config, overrides=args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"traineval: config error: {error}", file=sys.stderr)
        return 2
    from ..training.exit_codes import exit_status_of

    caught: tuple[type[BaseException], ...] = (*failures, ImportError, WorkerLost)
    try:
        result = tune(
            config, search, trials=args.trials, metric=args.metric, direction=args.direction,
            sampler=args.sampler, pruner=args.pruner, storage=args.storage,
            study_name=args.study_name, workers=args.workers, seed=args.seed,
        )  # fmt: skip
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        return _interrupted(stopped)
    except caught as error:
        print(f"traineval: error: {error}", file=sys.stderr)
        return exit_status_of(error)
    if result is None:
        return 0  # under torchrun, rank 0 reports
    print(trials_table(result.trials))
    metric = args.metric or config.training.monitor_metric
    chosen = ", ".join(f"{_short(k)}={_value(v)}" for k, v in result.best_params.items())
    print(f"\nBest: trial {result.best_number}, {metric} = {result.best_value:.4f} with {chosen}")
    print(f"Study: {result.study_dir} ({result.storage}); best config: {result.best_config}")
    return 0


def _interrupted(stopped: BaseException) -> int:
    """The study stopped on a signal: one line, exit 128+N (130 for SIGINT, 143 SIGTERM)."""
    from ..training.stopping import TrainingInterrupted, exit_status

    if isinstance(stopped, TrainingInterrupted):
        what, name = stopped.what, stopped.signal_name
    else:  # a second signal
        what, name = f"tune stopped at once ({stopped or 'interrupted'})", "SIGINT"
    print(f"traineval: {what}; run the same command to continue", file=sys.stderr)
    return exit_status(name)


def trials_table(trials: list[dict[str, Any]]) -> str:
    """The trials as a text table: number, state, value, seconds, parameters."""
    names = sorted({name for t in trials for name in t["params"]})
    short = [_short(n) for n in names]
    head = ["trial", "state", "value", "seconds", *short]
    rows = [
        [
            str(t["number"]),
            t["state"],
            _value(t["value"]),
            f"{t['seconds']:.1f}" if t["seconds"] is not None else "",
            *(_value(t["params"].get(n)) for n in names),
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(field: str) -> str:
    """A training field by its bare name (as a `search:` section may write it)."""
    return field.removeprefix("training.")


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
