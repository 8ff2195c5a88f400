"""`traineval`: train and evaluate from the command line.

traineval demo [key=value ...]            digits + small CNN, trained and tested
traineval fit CONFIG.yaml [key=value ...]  any run described by a YAML file
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from importlib import resources
from pathlib import Path

from .version import __version__

EPILOG = """\
overrides are dotted key=value pairs applied on top of the YAML file, with values read as
YAML: training.learning_rate=1e-3 training.num_epochs=5 model.name=mlp data.name=wine
sections: data, model, training, evaluation (see the README for every field).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traineval",
        description="Train and evaluate PyTorch models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"traineval {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    fit = commands.add_parser(
        "fit",
        help="train, evaluate on the test split, write the run directory",
        description="Train the model a YAML config describes, pick the best checkpoint on the "
        "validation split, evaluate it on the test split, and write everything to "
        "training.output_dir (default runs/run-<time>).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    fit.add_argument("config", type=Path, help="YAML file with data/model/training/evaluation")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    fit.add_argument("-q", "--quiet", action="store_true", help="only print the final table")
    fit.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint, or 'auto': the newest valid one in the output_dir",
    )

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits and evaluate it",
        description="The built-in example: scikit-learn's digits (1,797 8x8 images), a small "
        "CNN, early stopping on validation accuracy, checkpoints, then the test-set metrics. "
        "Takes well under a minute on two CPU cores.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    demo.add_argument("-q", "--quiet", action="store_true", help="only print the final table")
    demo.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `traineval` command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before or after options such as -q.
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # Imported here so that `--help` answers without loading torch.
    from .checkpoint import CheckpointError
    from .experiment import RunConfig, run_experiment
    from .loop import TrainingInterrupted
    from .steplog import NonFiniteError

    try:
        if args.command == "demo":
            source = resources.files("traineval").joinpath("configs/demo.yaml")
            with resources.as_file(source) as path:
                config = RunConfig.from_yaml(path, args.overrides)
        else:
            config = RunConfig.from_yaml(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"traineval: config error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        outcome = run_experiment(config, resume_from=args.resume)
    except TrainingInterrupted as interrupted:
        print(f"traineval: {interrupted}", file=sys.stderr)
        if interrupted.checkpoint:
            run_dir = Path(interrupted.checkpoint).parent.parent
            print(
                f"traineval: to continue, run the same command with "
                f"training.output_dir={run_dir} --resume auto",
                file=sys.stderr,
            )
        return 128 + getattr(signal, interrupted.signal_name, signal.SIGINT)
    except (
        ValueError,
        FileExistsError,
        NotImplementedError,
        CheckpointError,
        NonFiniteError,
    ) as error:
        print(f"traineval: error: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    training = outcome.training
    print(f"\nRun directory: {outcome.output_dir}")
    print(
        f"Trained {training.epochs_completed} epochs ({training.global_step} optimizer updates) "
        f"in {elapsed:.1f}s; best {training.monitor_metric} = {training.best_metric:.4f} "
        f"at epoch {training.best_epoch}" + (" (stopped early)" if training.stopped_early else "")
    )
    if outcome.test_metrics:
        print(f"\nTest metrics, {outcome.evaluated_checkpoint}:")
        print(_table(outcome.test_metrics))
    return 0


def _table(metrics: dict[str, float]) -> str:
    width = max(len(name) for name in metrics)
    lines = [f"  {'metric':<{width}}  value", f"  {'-' * width}  ------"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
