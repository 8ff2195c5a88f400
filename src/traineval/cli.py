"""`traineval`: train and evaluate from the command line.

- `traineval demo [key=value ...]`: digits + small CNN, trained and tested
- `traineval fit CONFIG.yaml [key=value ...]`: any run described by a YAML file
- `traineval evaluate RUN_DIR [--split test]`: a run's checkpoint on one of its splits
- `traineval predict RUN_DIR INPUT.csv`: a run's model on new rows
- `traineval cv CONFIG.yaml --folds K`: k-fold CV, then the folds as an ensemble
- `traineval lr-find CONFIG.yaml`: the learning-rate range test, with a suggested rate
- `traineval report RUN_DIR`: summary, learning curves and report.html
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .system.version import __version__
from .training.stopping import Stopped, exit_status, signal_name_of

EPILOG = """\
overrides are dotted key=value pairs applied on top of the YAML file, with values read as
YAML: training.learning_rate=1e-3 training.num_epochs=5 model.name=mlp data.name=wine
sections: data, model, training, evaluation (every field: docs/config-reference.md).
"""


def _search_summary(search: Any) -> str:
    """A range test in a few lines: a sample of its curve and the suggested rate."""
    count = len(search.losses)
    shown = sorted({round(i * (count - 1) / 9) for i in range(10)}) if count else []
    lines = [f"  {'learning rate':>13}  {'loss':>10}  {'smoothed':>10}"]
    for i in shown:
        lines.append(
            f"  {search.learning_rates[i]:>13.3g}  {search.losses[i]:>10.4f}  "
            f"{search.smoothed_losses[i]:>10.4f}"
        )
    ended = {"diverged": "the loss diverged", "non-finite loss": "a loss was not finite"}
    head = (
        f"Learning-rate range test, {count} updates ({ended.get(search.stop_reason, 'all run')}):"
    )
    if search.suggestion is None:
        tail = "No suggestion: too few updates before the loss stopped falling."
    else:
        tail = f"Suggested learning rate: {search.suggestion:.3g} (steepest fall of the loss)"
    return "\n".join([head, *lines, tail])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traineval",
        description="Train and evaluate PyTorch models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"traineval {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("TRAINEVAL_DEBUG", "") not in ("", "0"),
        help="show the traceback of an error (also TRAINEVAL_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    _add_fit(commands)
    _add_demo(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_cv(commands)
    _add_lr_find(commands)
    _add_flower(commands)
    _add_report(commands)
    _tune_command().add_parser(commands)
    return parser


def _tune_command() -> Any:
    from .tuning import command

    return command


def _add_fit(commands: Any) -> None:
    """`traineval fit CONFIG [key=value ...]`."""
    fit = commands.add_parser(
        "fit",
        help="train, evaluate on the test split, write the run directory",
        description="Train the model a YAML config describes, pick the best checkpoint on the "
        "validation split, evaluate it on the test split, and write everything to "
        "training.output_dir (default runs/run-<time>-<random>).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    fit.add_argument("config", type=Path, help="YAML file with data/model/training/evaluation")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    fit.add_argument("-q", "--quiet", action="store_true", help="only print the final table")
    fit.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint, or 'auto': the one furthest along in output_dir",
    )


def _add_demo(commands: Any) -> None:
    """`traineval demo [key=value ...]`."""
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


def _add_evaluate(commands: Any) -> None:
    """`traineval evaluate RUN_DIR`."""
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a run's checkpoint on one of its data splits",
        description="Rebuild a run's data splits and model from RUN_DIR/config.yaml, load a "
        "checkpoint, evaluate it and write RUN_DIR/evaluation/metrics_<split>.json (plus "
        "predictions and plots when asked).",
    )
    evaluate.add_argument("run_dir", type=Path, help="a run directory written by fit or demo")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument(
        "--checkpoint",
        help="best, last, epoch-NNNN, final (a Flower run's final weights) or a path "
        "(default best; for a run that keeps no best its final weights, or last)",
    )
    evaluate.add_argument("--save-predictions", action="store_true", help="write predictions")
    evaluate.add_argument("--plots", action="store_true", help="write the evaluation plots")
    evaluate.add_argument(
        "--trust-code",
        action="store_true",
        help="let RUN_DIR/config.yaml import the code it names (a custom model or data "
        "factory); only for run directories you trust",
    )


def _add_predict(commands: Any) -> None:
    """`traineval predict RUN_DIR INPUT.csv`."""
    predict = commands.add_parser(
        "predict",
        help="a run's model on new rows of a CSV file",
        description="Read INPUT (a CSV with the run's feature columns, by name, in any order), "
        "standardise them as in training, and write each row's prediction (class and class "
        "probabilities; label set and label probabilities; value) after the input's other "
        "columns, to --output (default RUN_DIR/predictions/<INPUT stem>-<hash of its path>.csv).",
    )
    predict.add_argument("run_dir", type=Path, help="a run directory written by fit or demo")
    predict.add_argument("input", type=Path, help="CSV file with a header row")
    predict.add_argument(
        "--checkpoint",
        help="best, last, epoch-NNNN, final (a Flower run's final weights) or a path "
        "(default best; for a run that keeps no best its final weights, or last)",
    )
    predict.add_argument("--output", type=str, help="where to write the predictions CSV")
    predict.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (never the input)"
    )
    predict.add_argument(
        "--trust-code",
        action="store_true",
        help="let RUN_DIR/config.yaml import the code it names (a custom model or data "
        "factory); only for run directories you trust",
    )


def _add_cv(commands: Any) -> None:
    """`traineval cv CONFIG --folds K`."""
    cv = commands.add_parser(
        "cv",
        help="k-fold cross-validation, then the fold models as an ensemble on the test split",
        description="Cross-validate on the train and validation rows of CONFIG's data "
        "(stratified for classification), each fold from fresh weights in "
        "<output_dir>/fold-<k>/, reporting each fold's best validation metrics, their mean "
        "and std; then evaluate the folds' best checkpoints as an ensemble on the test split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    cv.add_argument("config", type=Path, help="YAML file with data/model/training/evaluation")
    cv.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.add_argument("-q", "--quiet", action="store_true", help="only print the final tables")
    cv.add_argument(
        "--resume",
        choices=["auto"],
        help="continue the stopped cross-validation in training.output_dir: finished folds "
        "are kept, the stopped one resumes from its checkpoint",
    )


def _add_lr_find(commands: Any) -> None:
    """`traineval lr-find CONFIG`."""
    finder = commands.add_parser(
        "lr-find",
        help="learning-rate range test: loss against an exponentially growing rate",
        description="Train CONFIG's model on its train split for up to --steps updates while "
        "the learning rate grows exponentially from --min-lr to --max-lr (the config's "
        "optimizer, precision, accumulation and clipping), stop when the loss diverges, and "
        "suggest the rate where it fell fastest. Writes lr_find.json and lr_find.png into "
        "training.output_dir (default runs/lr-find-<time>); nothing else is kept.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    finder.add_argument("config", type=Path, help="YAML file with data/model/training")
    finder.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    finder.add_argument("--min-lr", type=float, default=1e-7, help="first rate (default 1e-7)")
    finder.add_argument("--max-lr", type=float, default=10.0, help="last rate (default 10)")
    finder.add_argument("--steps", type=int, default=100, help="updates at most (default 100)")
    finder.add_argument("-q", "--quiet", action="store_true", help="only print the result")


def _add_flower(commands: Any) -> None:
    """`traineval flower CONFIG --nodes N`."""
    flower = commands.add_parser(
        "flower",
        help="federated training on Flower (FedAvg), its nodes simulated in this process",
        description="Run traineval.federated.flower_app, the Flower app for config files, "
        "with NODES in-process SuperNodes: each trains on its share of the train split "
        "(mode.partition), the server runs Flower's FedAvg(M) for "
        "training.num_epochs rounds, evaluates on the val split each round and tests the "
        "final model. To deploy the same app on real SuperNodes, see docs/modes-federated.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    flower.add_argument("config", type=Path, help="YAML file with data/model/training/evaluation")
    flower.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    flower.add_argument("--nodes", type=int, default=None, help="nodes (default mode.clients)")
    flower.add_argument("-q", "--quiet", action="store_true", help="only print the final table")
    flower.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue a stopped run (auto: from training.output_dir's checkpoint)",
    )


def _add_report(commands: Any) -> None:
    """`traineval report RUN_DIR`."""
    report = commands.add_parser(
        "report",
        help="summarise a run and write its learning curves and a self-contained report.html",
        description="Read only the run directory (config.yaml, summary.json, metrics.jsonl, "
        "evaluation/), print the best epoch, final and best metrics, time and throughput, and "
        "write evaluation/learning_curves.png and report.html (plots embedded).",
    )
    report.add_argument("run_dir", type=Path, help="a run directory")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `traineval` command; returns the exit status.

    The failure boundary: whatever a command did not turn into its own sentence ends as one
    line naming the error (a file system error names the file; exit statuses: `exit_codes`),
    with the traceback only under `--debug` or TRAINEVAL_DEBUG=1."""
    args = _arguments(argv)
    previous = threading.excepthook
    if not args.debug:
        threading.excepthook = _thread_failed
    terminate = _on_sigterm(_terminate)
    try:
        return _command(args)
    except KeyboardInterrupt as stopped:  # outside a run's own handling: setup, the end
        if args.debug:
            raise
        name = signal_name_of(stopped)
        print(
            f"traineval: stopped by {name}; files written before it are intact (a run's "
            "summary.json says how it ended)",
            file=sys.stderr,
        )
        return exit_status(name)
    except Exception as error:
        if args.debug:
            raise
        return _unexpected(error)
    finally:
        threading.excepthook = previous
        _on_sigterm(terminate)


def _on_sigterm(handler: Any) -> Any:
    """Set SIGTERM's handler; the one before. Not under torchrun, whose ranks may wait in
    C++ (a rendezvous, a barrier), where a Python handler never runs and torchrun kills
    them 30 s later: there the default action stops them at once. Nor off the main thread."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    if os.environ.get("TORCHELASTIC_RUN_ID") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    global _COMMAND_PID
    _COMMAND_PID = os.getpid()  # the process whose command it is (a fork's child is not)
    return signal.signal(signal.SIGTERM, handler)


def _thread_failed(failure: Any) -> None:
    """A library's background thread (TensorBoard's event writer on a full disk) that ends
    with an error: one line, not its traceback printed across the command's own lines."""
    if failure.exc_type is SystemExit:
        return
    text = str(failure.exc_value or "").strip().splitlines()
    thread = failure.thread
    name = "?" if thread is None else f"{thread.name} ({type(thread).__module__.split('.')[0]})"
    logging.getLogger("traineval").warning(
        "traineval: background thread %s ended with %s%s (--debug shows the traceback)",
        name,
        failure.exc_type.__name__,
        f": {text[0]}" if text else "",
    )


def _unexpected(error: Exception) -> int:
    """An error no command caught, in one line: what, where (a file), how to see more.
    Exit 1, or 2 for a file name the user chose that cannot be (too long, a loop)."""
    from .training.exit_codes import exit_status_of

    if isinstance(error, RecursionError):
        what = "an input nests too deeply to be read (a hostile or damaged file?)"
    elif isinstance(error, MemoryError):
        what = "out of memory (is a size in the config or a file far too large?)"
    elif isinstance(error, OSError) and error.filename is not None:
        what = f"{error.strerror or error} ({error.filename}); files written before are intact"
    else:
        text = str(error).strip().splitlines()
        what = f"{type(error).__name__}: {text[0] if text else 'no message'}"
    if not _said_by_rank_0(error):
        print(f"traineval: {_rank_prefix()}error: {what} (--debug shows the traceback)",
              file=sys.stderr)  # fmt: skip
    return exit_status_of(error) if isinstance(error, OSError) else 1


def _command(args: argparse.Namespace) -> int:
    if args.command == "report":
        return _report(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "tune":
        return int(_tune_command().run(args, _failures()))
    config = _run_config(args)
    if config is None:
        return 2
    if args.command == "flower":
        return _flower_command(config, args)
    if args.command == "lr-find":
        return _lr_find(config, args)
    if args.command == "cv":
        return _cv(config, args)
    return _fit(config, args)


FLAG_ALIASES = {"lr": "learning_rate", "bs": "batch_size", "epochs": "num_epochs"}


def _override_hint(extra: list[str]) -> str:
    """For a flag that names a setting (`--epochs 5`): the override to write instead
    (`training.num_epochs=5`); settings are `section.field=value`, not options."""
    import difflib

    from .commands.experiment import _SECTIONS

    keys: dict[str, str] = {}  # field -> its dotted key (the first section that has it)
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            keys.setdefault(f.name, f"{section}.{f.name}")
    hints = []
    for i, item in enumerate(extra):
        if not item.startswith("--") or "=" in item:
            continue
        name = FLAG_ALIASES.get(item[2:], item[2:].replace("-", "_"))
        close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.7)  # exact first
        if close:
            following = extra[i + 1] if i + 1 < len(extra) else ""
            value = following if following and not following.startswith("-") else "..."
            hints.append(f"{keys[close[0]]}={value}")
    if not hints:
        return ""
    return f" (settings are overrides, not options: did you mean {' '.join(hints)}?)"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (overrides may come before or after options such as -q) and
    set up logging: INFO, or WARNING when quiet and on every rank but rank 0."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also after the command: `traineval fit run.yaml --debug`
        extra = [item for item in extra if item != "--debug"]
        args.debug = True
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_override_hint(extra)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    quiet = getattr(args, "quiet", False) or os.environ.get("RANK", "0") != "0"
    from .callbacks.progress import BarAwareHandler

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[BarAwareHandler(sys.stderr)],
    )
    return args


def _failures() -> tuple[type[BaseException], ...]:
    """The errors a command reports in one line (exit 1) instead of a traceback. Imported
    here, as everything that loads torch, so that `--help` answers without it."""
    from .runs.checkpoint import CheckpointError
    from .system.files import WriteError
    from .training.steplog import NonFiniteError

    return (
        ValueError,
        FileExistsError,
        FileNotFoundError,
        NotImplementedError,
        CheckpointError,
        NonFiniteError,
        WriteError,
    )


def _error(error: BaseException) -> int:
    """Print `error` as the command's one line; its exit status (see `exit_codes`). Under
    torchrun a rank other than 0 names itself, and says nothing of what every rank agreed
    on (`_said_by_rank_0`)."""
    from .training.exit_codes import error_line, exit_status_of

    if not _said_by_rank_0(error):
        print(f"traineval: {_rank_prefix()}error: {error_line(error)}", file=sys.stderr)
    return exit_status_of(error)


def _torchrun_rank(local: bool = False) -> int | None:
    """This process's rank (or rank on its node) under torchrun; None outside it (other
    launchers set RANK too, for a process that is alone)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("LOCAL_RANK" if local else "RANK", "0"))


def _other_rank(local: bool = False) -> bool:
    """Whether this is a torchrun rank other than 0 (of the job, or of its node)."""
    return (_torchrun_rank(local) or 0) != 0


def _rank_prefix() -> str:
    return f"rank {_torchrun_rank()}: " if _other_rank() else ""


def _said_by_rank_0(error: BaseException) -> bool:
    """A rank other than 0 whose error is one the ranks agreed on: a validation that failed
    (on any rank), a non-finite step, a refused setting (every rank read the same config).
    Anything else it says too, naming itself: it may be its own (its data, its device)."""
    from .config.checks import SettingError
    from .training.steplog import NonFiniteError
    from .training.stop_rules import EvaluationError

    agreed = (EvaluationError, NonFiniteError, SettingError)
    return _other_rank() and isinstance(error, agreed)


def _report(args: argparse.Namespace) -> int:
    from .commands.report import summary_text, write_report
    from .runs.rundir import is_cross_validation
    from .tuning.report import is_study, study_summary, write_study_report

    if is_study(args.run_dir):  # a `traineval tune` study directory
        try:
            study, page = write_study_report(args.run_dir)
        except (ValueError, ImportError) as error:
            return _error(error)
        print(study_summary(study))
        print(f"\nWritten: {page}")
        return 0
    if is_cross_validation(args.run_dir):  # a `traineval cv` folder: its tables
        return _report_cv(Path(args.run_dir))
    try:
        run, page = write_report(args.run_dir)
    except (FileNotFoundError, ValueError, ImportError) as error:
        return _error(error)
    print(summary_text(run))
    print(f"\nWritten: {page}")
    return 0


def _report_cv(folder: Path) -> int:
    """A cross-validation's tables, as `traineval cv` printed them: its cv.json, or where
    it stopped before its test evaluation its cv_summary.json (the folds alone)."""
    from .runs.rundir import CV_SUMMARY
    from .system.untrusted_text import read_json

    path = folder / "evaluation" / "cv.json"
    path = path if path.is_file() else folder / CV_SUMMARY
    if not path.exists():
        return _error(ValueError(
            f"the cross-validation in {str(folder)!r} stopped before its end (no "
            f"{CV_SUMMARY}): continue it with --resume auto; each fold is a run of its own "
            f"(traineval report {folder}/fold-1)"
        ))  # fmt: skip
    try:
        text = _cv_tables(read_json(path, "cross-validation summary"), written=False)
    except ValueError as error:
        return _error(error)
    except (KeyError, TypeError, IndexError, AttributeError):
        return _error(ValueError(f"{str(path)!r} does not hold a cross-validation summary"))
    print(text)
    print(f"\nRead: {path}; each fold is a run of its own (traineval report {folder}/fold-1)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """`traineval predict`: the run's model on the input CSV's rows, written to a CSV file."""
    from .commands.predict import PredictCsvOptions, predict_csv
    from .runs.checkpoint import default_checkpoint

    args.checkpoint = args.checkpoint or default_checkpoint(args.run_dir)
    try:
        table, count = predict_csv(
            args.run_dir,
            args.input,
            PredictCsvOptions(checkpoint=args.checkpoint),
            output=args.output,
            trust_code=args.trust_code,
            overwrite=args.overwrite,
        )
    except _failures() as error:
        return _error(error)
    from .assembly.results import counted

    print(f"Predicted {counted(count, 'row')} with {args.checkpoint}; written: {table}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .commands.experiment import evaluate_run
    from .runs.checkpoint import default_checkpoint

    args.checkpoint = args.checkpoint or default_checkpoint(args.run_dir)
    try:
        metrics, written = evaluate_run(
            args.run_dir,
            checkpoint=args.checkpoint,
            split=args.split,
            save_predictions=args.save_predictions,
            plot_metrics=args.plots,
            trust_code=args.trust_code,
        )
    except _failures() as error:
        return _error(error)
    print(f"{args.split} metrics, checkpoint {args.checkpoint}:")
    record = json.loads(Path(written).read_text())
    print(_table(metrics, record.get("intervals")))
    per_class = record.get("per_class")
    if per_class:
        print(f"\nPer class ({args.split}):")
        print(_per_class_table(per_class))
    files = [str(f) for f in (record.get("files") or {}).values() if isinstance(f, str)]
    print(f"\nWritten: {', '.join([written, *files])}")
    if args.plots and not any(f.endswith(".png") for f in files):
        print("(--plots: this task has no plots)")
    return 0


def _run_config(args: argparse.Namespace) -> Any:
    """The command's RunConfig (the demo's shipped one, or CONFIG) with the overrides; None
    after printing a config error."""
    from .commands.experiment import RunConfig
    from .config.code_references import add_search_path

    try:
        if args.command == "demo":
            source = resources.files("traineval").joinpath("configs/demo.yaml")
            with resources.as_file(source) as path:
                return RunConfig.from_yaml(path, args.overrides)
        add_search_path(Path(args.config).parent)  # my_pkg beside the config imports
        return RunConfig.from_yaml(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        if not _other_rank(local=True):  # every rank of a node read the same file
            print(f"traineval: config error: {error}", file=sys.stderr)
        return None


def _flower_command(config: Any, args: argparse.Namespace) -> int:
    from .runs.rundir import default_run_dir

    failures: tuple[type[BaseException], ...] = (*_failures(), ImportError)
    named = config.training.output_dir
    if not named and args.resume is None:  # named now: a stop's line says where to resume
        training = config.training.replace(output_dir=str(default_run_dir("flower")))
        config = dataclasses.replace(config, training=training)
    try:
        return _flower(config, args.nodes, args.resume)
    except KeyboardInterrupt as stopped:
        name = signal_name_of(stopped)
        again = "the same command with --resume auto" + (
            "" if named else f" and training.output_dir={config.training.output_dir}"
        )
        print(
            f"traineval: interrupted by {name}; the rounds finished so far are saved in "
            f"{config.training.output_dir}. To continue, run {again}",
            file=sys.stderr,
        )
        return exit_status(name)
    except failures as error:
        return _error(error)


_COMMAND_PID = os.getpid()


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM outside a run's own handling (a training run stops at its next step
    boundary instead): stop as Ctrl-C stops it, said in one line (a Flower run has no step
    boundary of ours to stop at; at a command's start or end nothing is left to save). A
    forked child (a DataLoader worker) dies of it as it would have."""
    if os.getpid() != _COMMAND_PID:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Stopped("SIGTERM")


def _lr_find(config: Any, args: argparse.Namespace) -> int:
    from .commands.experiment import find_learning_rate
    from .training.loop import TrainingInterrupted

    try:
        search, folder = find_learning_rate(
            config, min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps
        )
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        name = signal_name_of(stopped)
        print(
            f"traineval: lr-find stopped by {name}; nothing was written (the range test "
            "trains a throwaway copy of the model): run it again",
            file=sys.stderr,
        )
        return 128 + getattr(signal, name, signal.SIGINT)
    except _failures() as error:
        return _error(error)
    print(_search_summary(search))
    written = [folder / name for name in ("lr_find.json", "lr_find.png")]
    print(f"\nWritten: {', '.join(str(p) for p in written if p.exists())}")
    return 0


def _cv(config: Any, args: argparse.Namespace) -> int:
    from .commands.experiment import run_cross_validation
    from .runs.rundir import default_run_dir
    from .training.loop import TrainingInterrupted

    if args.resume and not config.training.output_dir:  # before the data is read
        return _error(ValueError(
            "--resume needs the cross-validation's folder: set training.output_dir=<the "
            "stopped cross-validation's output_dir>"
        ))  # fmt: skip
    if not config.training.output_dir:  # named now: a stop's line says where to resume
        training = config.training.replace(output_dir=str(default_run_dir("cv")))
        config = dataclasses.replace(config, training=training)
    try:
        summary = run_cross_validation(config, args.folds, resume=args.resume == "auto")
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        return _cv_interrupted(stopped, Path(config.training.output_dir))
    except _failures() as error:
        return _error(error)
    print(_cv_tables(summary))
    return 0


def _fit(config: Any, args: argparse.Namespace) -> int:
    """`fit` and `demo`: train, test the best checkpoint, print the outcome."""
    from .commands.experiment import run_experiment
    from .training.loop import TrainingInterrupted

    started = time.perf_counter()
    try:
        outcome = run_experiment(config, resume_from=args.resume)
    except TrainingInterrupted as interrupted:
        return _interrupted(interrupted)
    except KeyboardInterrupt as stopped:
        return _stopped_at_once(stopped)
    except _failures() as error:
        return _error(error)
    elapsed = time.perf_counter() - started
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    training = outcome.training
    print(f"\nRun directory: {outcome.output_dir}")
    print(_trained_line(training, elapsed))
    if training.status == "time limit":
        print(f"{training.stop_reason} (--resume auto); the test split is evaluated at the end")
    if outcome.test_metrics:
        print(f"\nTest metrics, {outcome.evaluated_checkpoint}:")
        print(_table(outcome.test_metrics, outcome.test_intervals))
    return 0


def _trained_line(training: Any, elapsed: float) -> str:
    """What `fit` trained, in one line: the whole run, a resume's later part, or nothing."""
    from .assembly.results import counted

    best = (
        f"best {training.monitor_metric} = {training.best_metric:.4f} at epoch "
        f"{training.best_epoch}"
        if training.best_metric is not None
        else f"no {training.monitor_metric} measured yet"
    )
    best += " (stopped early)" if training.stopped_early else ""
    done, trained = training.trained_words(), training.updates_trained
    if training.global_step and not trained:  # a finished run, resumed
        return f"Nothing to train: the run had finished, {done}; {best}"
    if trained < training.global_step:  # a resume: this command trained the later part
        return (
            f"Trained {counted(trained, 'optimizer update')} in {elapsed:.1f}s, resumed at "
            f"update {training.global_step - trained}: the run has trained {done}; {best}"
        )
    return f"Trained {done} in {elapsed:.1f}s; {best}"


def _cv_interrupted(stopped: BaseException, base: Path) -> int:
    """Cross-validation stopped by a signal: which folds finished, and how to go on
    (128+N)."""
    from .assembly.cross_validation import fold_finished

    finished = sorted(p.name for p in base.glob("fold-*") if fold_finished(p))
    print(
        f"traineval: cross-validation stopped by {signal_name_of(stopped)}; finished folds in "
        f"{base}: {', '.join(finished) or 'none'}. To continue (finished folds kept, the "
        "stopped one resumed), run the same command with "
        f"training.output_dir={shlex.quote(str(base))} --resume auto",
        file=sys.stderr,
    )
    return exit_status(signal_name_of(stopped))


def _interrupted(interrupted: Any) -> int:
    """A signal stopped the run after saving: one line saying where, and how to continue
    (exit 128+N: 130 for SIGINT, 143 for SIGTERM, what schedulers requeue on)."""
    from .training.stopping import exit_status

    if interrupted.checkpoint:
        run_dir = Path(interrupted.checkpoint).parent.parent
        how = f"to continue, run the same command with training.output_dir={run_dir} --resume auto"
    else:
        how = "no checkpoint was written: run the command again"
    if not _other_rank():  # the ranks agreed on the stop: rank 0 says it
        print(f"traineval: {interrupted.what}; {how}", file=sys.stderr)
    return exit_status(interrupted.signal_name)


def _stopped_at_once(stopped: KeyboardInterrupt) -> int:
    """A second Ctrl-C (or SIGTERM), or one before the run's own handling, stopped the
    command at once: one line, exit 130 (143 for SIGTERM)."""
    why = str(stopped) or "interrupted"
    print(
        f"traineval: {why}; the checkpoints written before it are kept (continue with "
        "--resume auto)",
        file=sys.stderr,
    )
    return exit_status(signal_name_of(stopped))


def _flower(config: Any, nodes: int | None, resume_from: str | None = None) -> int:
    """`traineval flower`: the config app with in-process nodes; prints the test metrics."""
    import dataclasses
    import json

    from .federated.flower import planned_rounds, saved_round
    from .federated.flower_app import federated_settings
    from .runs.checkpoint import flower_run_ended

    _quiet_flower_log()
    federated = federated_settings(config)
    nodes = federated.clients if nodes is None else nodes
    if nodes < 1:
        raise ValueError(f"--nodes={nodes} is invalid: expected at least 1")
    if resume_from is not None and not config.training.output_dir:
        raise ValueError(
            "--resume needs the run directory: set training.output_dir=<the stopped run's "
            "output_dir>"
        )
    output_dir = str(config.training.output_dir)  # (named by _flower_command)
    done = saved_round(output_dir) if resume_from == "auto" else None
    rounds = planned_rounds(config.training)
    if done is not None and done >= rounds and flower_run_ended(output_dir):
        print(
            f"Nothing to resume: the Flower run in {output_dir} finished its {done} rounds "
            f"(training.num_epochs={config.training.num_epochs})"
        )
        return 0
    training = config.training.replace(output_dir=output_dir)
    # the server waits for `clients` nodes: all of them
    mode = dataclasses.replace(federated, clients=nodes)
    config = dataclasses.replace(config, training=training, mode=mode)
    started = time.perf_counter()
    _run_flower_app(config, nodes, resume_from, rounds)
    output = Path(output_dir)
    record = json.loads((output / "evaluation" / "metrics.json").read_text())
    print(f"\nRun directory: {output}")
    trained = _flower_rounds_said(done, rounds)
    print(f"{trained} on {nodes} in-process nodes in {time.perf_counter() - started:.1f}s")
    if record["test"]:
        print("\nTest metrics, final global model:")
        print(_table(record["test"]))
    return 0


def _run_flower_app(config: Any, nodes: int, resume_from: str | None, rounds: int) -> None:
    """Run the config app on `nodes` in-process nodes in `config`'s output_dir (held), and
    write its summary.json however it ends."""
    import tempfile

    import yaml

    from .federated.flower import RESUME_KEY, flower_summary, run_local
    from .federated.flower_app import CONFIG_KEY, clientapp, serverapp
    from .runs.rundir import run_dir_lock

    output, started = Path(config.training.output_dir), time.perf_counter()
    with run_dir_lock(output), tempfile.TemporaryDirectory() as folder:  # the app reads it
        path = Path(folder) / "config.yaml"
        written = {**config.to_dict(), "training": config.training.given_dict()}  # defaults
        path.write_text(yaml.safe_dump(written, sort_keys=False))  # stay defaults
        nodes_config = [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
        run_config = {CONFIG_KEY: str(path)}
        if resume_from is not None:
            run_config[RESUME_KEY] = resume_from
        try:
            run_local(serverapp, clientapp, nodes_config, run_config)
        except BaseException as error:
            flower_summary(output, rounds, time.perf_counter() - started, error)
            raise
        flower_summary(output, rounds, time.perf_counter() - started)


def _quiet_flower_log() -> None:
    """Flower's log lines once (its own handler, not again through ours), not round by
    round under -q, and without colour codes where stderr is not a terminal (a log file)."""
    flower_log = logging.getLogger("flwr")
    if flower_log.handlers:
        flower_log.propagate = False
    for handler in flower_log.handlers:
        if hasattr(handler, "colored") and isinstance(handler, logging.StreamHandler):
            handler.colored = bool(getattr(handler.stream, "isatty", lambda: False)())  # type: ignore[attr-defined]
    if logging.getLogger().level > logging.INFO:
        flower_log.setLevel(logging.WARNING)


def _flower_rounds_said(done: int | None, rounds: int) -> str:
    """What a Flower run trained, said for its last lines: all `rounds`, or those after the
    `done` ones it resumed from."""
    from .assembly.results import counted

    if not done:
        return f"Trained {counted(rounds, 'Flower round')}"
    if done >= rounds:  # it had stopped after its last round, before the final model
        return f"Saved the final model of the {done} finished Flower rounds"
    if done + 1 == rounds:
        return f"Trained Flower round {rounds} (resumed after round {done})"
    return f"Trained Flower rounds {done + 1}-{rounds} (resumed after round {done})"


def _cv_tables(summary: dict[str, Any], written: bool = True) -> str:
    folds = summary["folds"]
    names = list(folds[0]["best_metrics"])
    lines = [f"\nCross-validation, {len(folds)} folds (best validation metrics of each fold):"]
    lines.append("  fold  epoch  " + "  ".join(f"{n:>10}" for n in names))
    for fold in folds:
        values = "  ".join(f"{fold['best_metrics'][n]:>10.4f}" for n in names)
        lines.append(f"  {fold['fold']:>4}  {fold['best_epoch']:>5}  {values}")
    mean = "  ".join(f"{summary[n + '_mean']:>10.4f}" for n in names)
    std = "  ".join(f"{summary[n + '_std']:>10.4f}" for n in names)
    lines += [f"  {'mean':>4}  {'':>5}  {mean}", f"  {'std':>4}  {'':>5}  {std}"]
    if "test_ensemble" in summary:
        lines.append("\nTest split: the folds' best checkpoints, alone and as an ensemble:")
        test_names = list(summary["test_ensemble"])
        lines.append("  model     " + "  ".join(f"{n:>10}" for n in test_names))
        for i, member in enumerate(summary["test_members"], start=1):
            values = "  ".join(f"{member[n]:>10.4f}" for n in test_names)
            lines.append(f"  fold {i:<4} {values}")
        values = "  ".join(f"{summary['test_ensemble'][n]:>10.4f}" for n in test_names)
        lines.append(f"  ensemble  {values}")
    if written:
        lines.append(f"\nWritten: {summary['output_dir']}/evaluation/cv.json")
    return "\n".join(lines)


def _per_class_table(rows: list[dict[str, Any]]) -> str:
    width = max(5, *(len(str(row["label"])) for row in rows))
    lines = [f"  {'class':<{width}}  precision  recall     f1  support"]
    lines += [
        f"  {row['label']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
        f"{row['f1']:6.4f}  {row['support']:7d}"
        for row in rows
    ]
    return "\n".join(lines)


def _table(metrics: dict[str, float], intervals: dict[str, Any] | None = None) -> str:
    """Metrics as a two-column table; with bootstrap intervals, a third column for them."""
    width = max(len(name) for name in metrics)
    bounds = intervals.get("metrics", {}) if intervals else {}
    head, rule = f"  {'metric':<{width}}  value", f"  {'-' * width}  ------"
    if intervals and bounds:
        head += f"   {100 * intervals['confidence_level']:g}% interval"
        rule += f"  {'-' * 16}"
    lines = [head, rule]
    for name, value in metrics.items():
        low_high = f"[{bounds[name][0]:.4f}, {bounds[name][1]:.4f}]" if name in bounds else ""
        lines.append(f"  {name:<{width}}  {value:.4f}  {low_high}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
