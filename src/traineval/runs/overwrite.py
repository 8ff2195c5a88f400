"""`overwrite_output_dir`: an earlier run's outputs are set aside, not deleted, until this run
has something to show for itself.

When a run starts over an earlier one, the earlier run's outputs (its checkpoints, the
evaluation files, the TensorBoard events, `metrics.jsonl`, `summary.json`, the logger ids,
...) move into `<run dir>/.overwritten/`, so that neither a resume nor a report takes one of
them for this run's. They are dropped when this run finishes, or when it stops having
written a checkpoint of its own; when it fails before its first checkpoint (a bad value
found at the first batch, say) they move back, so a mistake in the new run loses nothing
the old one saved. A run killed in between leaves the folder behind; the next start on the
directory settles it the same way (`settle`, before anything reads the directory).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config.code_references import CODE_PATHS_FILE
from ..data.splits import SCHEMA_FILE
from .checkpoint import FINAL_WEIGHTS

logger = logging.getLogger(__name__)

ASIDE = ".overwritten"
# what a run writes at the top of its directory (beside `checkpoints/`, whose files move
# one by one); what else is there (your own files, lr_find's results) stays
RUN_OUTPUTS = (
    "evaluation",
    "tensorboard",
    "predictions",
    "report_files",
    "config.yaml",
    SCHEMA_FILE,
    CODE_PATHS_FILE,
    "mode.json",
    "metrics.jsonl",
    "summary.json",
    "report.html",
    FINAL_WEIGHTS,
    "wandb_run_id.txt",  # the loggers' ids (loggers.wandb, loggers.mlflow: a wing above)
    "mlflow_run_id.txt",
    "wandb_process.log",
)


def set_aside(folder: Path) -> list[str]:
    """Move the earlier run's outputs into `.overwritten/`; return their names."""
    aside = folder / ASIDE
    checkpoints = folder / "checkpoints"
    earlier = sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []
    outputs = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if not earlier and not outputs:
        return []
    (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
    for path in earlier:
        path.rename(aside / "checkpoints" / path.name)
    for name in outputs:
        (folder / name).rename(aside / name)
    return [*(f"checkpoints/{path.name}" for path in earlier), *outputs]


def settle(folder: Path, *, failed: bool) -> None:
    """Drop the set-aside outputs, or put them back when this run `failed` before writing a
    checkpoint of its own (its outputs then go: they describe a run that has nothing)."""
    aside = folder / ASIDE
    if not aside.is_dir():
        return
    checkpoints = folder / "checkpoints"
    if not failed or has_a_checkpoint(checkpoints):
        shutil.rmtree(aside)
        return
    checkpoints.mkdir(exist_ok=True)
    for path in (aside / "checkpoints").iterdir():
        _put_back(path, checkpoints / path.name)
    for path in aside.iterdir():
        if path.name != "checkpoints":
            _put_back(path, folder / path.name)
    shutil.rmtree(aside)
    logger.warning(
        "overwrite_output_dir: this run stopped before its first checkpoint; the earlier "
        "run's files in %s are back in place",
        folder,
    )


def has_a_checkpoint(checkpoints: Path) -> bool:
    """Whether `checkpoints` holds a finished checkpoint (`<name>.pt`; a save cut short
    leaves only a hidden temporary file or an unnamed shard folder)."""
    if not checkpoints.is_dir():
        return False
    return any(
        path.suffix == ".pt" and not path.name.startswith(".") and path.is_file()
        for path in checkpoints.iterdir()
    )


def _put_back(path: Path, target: Path) -> None:
    """`path` at `target`, in place of what the failed run wrote there."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    path.rename(target)
