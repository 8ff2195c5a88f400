"""TensorBoard: scalars under the same names as metrics.jsonl, the config as text, hparams."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .base import numbers

logger = logging.getLogger(__name__)


def wait_for_a_later_second(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the
    second it was created, then the host, process id and a counter. A resumed run's file
    must come after the interrupted run's, or its purge of their later steps is read first
    and undone: when a file of this second exists already (a resume within a second of the
    interruption), wait for the next second (at most one)."""
    stamps = []
    for path in folder.glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3]
        if stamp.isdigit():
            stamps.append(int(stamp))
    if stamps:
        time.sleep(max(0.0, max(stamps) + 1 - time.time()))


class TensorBoardLogger:
    """Write event files to `<run_dir>/tensorboard/` (needs the `tensorboard` package)."""

    def __init__(
        self,
        run_dir: str | Path,
        purge_step: int | None = None,
        replay: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """`purge_step`: on resume, TensorBoard drops the earlier run's events from this
        step on; `replay`: the records (metrics.jsonl's) the resumed run keeps at that step,
        logged again, so that a checkpoint written inside a step (the best during an epoch's
        validation) leaves that step's points as the uninterrupted run's."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "tensorboard_logging needs the tensorboard package: "
                "pip install 'traineval[tensorboard]'"
            ) from None
        self.folder = Path(run_dir) / "tensorboard"
        if purge_step is not None:
            wait_for_a_later_second(self.folder)
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step)
        self._hparams: dict[str, Any] = {}
        self._best: dict[str, float] = {}
        self._warned: set[str] = set()
        for record in replay:
            assert purge_step is not None
            self.log({k: v for k, v in record.items() if k != "step"}, purge_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        kept = numbers(metrics)
        for name, value in kept.items():
            self.writer.add_scalar(name, value, global_step=step)
        self._say_dropped(metrics, kept, step)
        for name in ("best_metric",):
            if name in metrics:
                self._best[name] = float(metrics[name])

    def _say_dropped(self, metrics: Mapping[str, Any], kept: Mapping[str, Any], step: int) -> None:
        """Name, once per metric, a NaN or infinite value TensorBoard gets no point for."""
        for name, value in metrics.items():
            if isinstance(value, float) and name not in kept and name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "TensorBoard: %s is %s at step %d; no point is drawn for it (metrics.jsonl "
                    "records it); further non-finite values of %s are not reported",
                    name,
                    value,
                    step,
                    name,
                )

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", f"```\n{text}\n```", global_step=0)
        self._hparams = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}

    def close(self) -> None:
        """Flush and close; the hparams entry (the config's values and the best metric) is
        this close's alone: a resumed run's replaces the stopped run's (with its NaN best),
        as the uninterrupted run has one."""
        if self._hparams:
            for earlier in (self.folder / "hparams").glob("events.out.tfevents.*"):
                earlier.unlink(missing_ok=True)
            self.writer.add_hparams(
                self._hparams, self._best or {"best_metric": float("nan")}, run_name="hparams"
            )
        self.writer.flush()
        self.writer.close()
