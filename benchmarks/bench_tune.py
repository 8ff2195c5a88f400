"""Hyperparameter search on the digits demo: what the search machinery costs per trial, and
what 20 trials find against the demo's own config.

The shipped demo config (scikit-learn's digits, the small CNN, early stopping on
val_accuracy), with `--epochs` per trial (default 5: a short trial) and 1,000 bootstrap
resamples of the test set. `traineval.tune` with TPE (seed 0) and the median pruner over
the learning rate (1e-4..1e-1, log), batch size (16/32/64), weight decay (1e-6..1e-2, log)
and dropout (0..0.5); trial 0 is the config as written.

- Overhead per trial, as a share of a trial's time: per trial, Optuna's own span of the
  trial (start to finish) minus the time inside `run_experiment` (the sampler's
  suggestions, the config, the SQLite writes of reports, attributes and the result); and
  once per study (opening the storage, checking the space and metric against the data),
  spread over the trials.
- Best trial vs the default (trial 0): validation accuracy (the tuned metric) and the test
  accuracy with its 95% bootstrap interval, both from the trials' run directories.

    .venv/bin/python benchmarks/bench_tune.py [--trials 20] [--epochs 5] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from importlib import resources
from pathlib import Path

import optuna
import torch

from traineval.commands.experiment import RunConfig
from traineval.tuning import tune

SEARCH = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": [16, 32, 64],
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "model.options.dropout": {"low": 0.0, "high": 0.5},
}


def _test(run_dir: str) -> tuple[float, list[float]]:
    record = json.loads((Path(run_dir) / "evaluation" / "metrics.json").read_text())
    accuracy = record["test"]["accuracy"]
    return accuracy, record["test_intervals"]["metrics"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = resources.files("traineval").joinpath("configs/demo.yaml")
    with resources.as_file(source) as path, tempfile.TemporaryDirectory() as folder:
        overrides = [
            f"training.num_epochs={args.epochs}",
            "training.progress_bar=false",
            "evaluation.bootstrap_samples=1000",
            f"training.output_dir={folder}/study",
        ]
        config = RunConfig.from_yaml(path, overrides)
        started = time.perf_counter()
        result = tune(config, SEARCH, trials=args.trials)
        wall = time.perf_counter() - started
        trials = result.trials
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
        spans = [
            (t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials()
        ]
        inside = [t["seconds"] for t in trials]
        per_trial = wall / len(trials)
        marginal = (sum(spans) - sum(inside)) / len(trials)
        fixed = (wall - sum(spans)) / len(trials)
        default, best = trials[0], next(t for t in trials if t["number"] == result.best_number)
        rows = []
        for name, trial in (("default config (trial 0)", default), ("best of the study", best)):
            accuracy, (low, high) = _test(trial["run_dir"])
            rows.append(
                f"| {name} | {trial['number']} | {trial['value']:.4f} | {accuracy:.4f} "
                f"[{low:.4f}, {high:.4f}] |"
            )
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    table = "\n".join(
        [
            f"`traineval tune` on the digits demo, {args.trials} trials of <= {args.epochs} "
            f"epochs, TPE seed 0, median pruner; torch {torch.__version__}, optuna "
            f"{optuna.__version__}; trials {states}",
            "",
            f"Per trial: {per_trial:.2f} s wall, {sum(inside) / len(inside):.2f} s inside the "
            f"run; search machinery per trial {marginal:.3f} s "
            f"({100 * marginal / per_trial:.1f}% of a trial), plus the study's start-up spread "
            f"over its trials {fixed:.3f} s ({100 * fixed / per_trial:.1f}%)",
            "",
            "| configuration | trial | val accuracy | test accuracy [95% bootstrap] |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Best parameters: {best['params']}",
        ]
    )
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
