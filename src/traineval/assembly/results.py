"""What a training run returns and leaves in `summary.json`: `TrainingResult`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..runs.train_state import TrainState
from ..system.distributed import Distributed
from ..system.files import atomic_write_json
from ..training.steplog import StepRecord


@dataclasses.dataclass
class TrainingResult(Mapping[str, Any]):
    """What `train` returns; also readable as a mapping (`result["best_metric"]`)."""

    training_history: dict[str, list[Any]]
    best_metric: float | None
    best_epoch: int | None
    best_step: int | None
    global_step: int
    # whole epochs trained; a stop inside an epoch (max_steps, a signal) leaves that epoch
    # out and counts its micro-batches in `batches_into_epoch`
    epochs_completed: int
    stopped_early: bool
    stop_reason: str | None
    monitor_metric: str
    output_dir: str
    train_seconds: float
    performance: dict[str, Any]
    checkpoints: dict[str, str]
    # "finished" (its epochs or max_steps), "stopped early" (early stopping, stop_when),
    # "time limit" (max_time: resume it), "interrupted" (a signal: resume it), "failed" (an
    # error: `stop_reason` names it)
    status: str = "finished"
    # optimizer updates this call trained: global_step less the resumed checkpoint's (0 for
    # a resume of a run that had finished)
    updates_trained: int = 0
    # micro-batches trained of an epoch the run stopped inside (0: it stopped between epochs)
    batches_into_epoch: int = 0

    @classmethod
    def of(
        cls,
        state: TrainState,
        monitor_name: str,
        output_dir: Path,
        seconds: float = 0.0,
        performance: dict[str, Any] | None = None,
        checkpoints: dict[str, str] | None = None,
    ) -> TrainingResult:
        """The result of a run whose loop ended in `state`."""
        return cls(
            training_history=state.history,
            best_metric=state.best_metric,
            best_epoch=state.best_epoch,
            best_step=state.best_step,
            global_step=state.global_step,
            epochs_completed=state.epoch - (state.batch_in_epoch > 0),
            stopped_early=state.stopped_early,
            stop_reason=state.stop_reason,
            monitor_metric=monitor_name,
            output_dir=str(output_dir),
            train_seconds=seconds,
            performance=performance or {},
            checkpoints=checkpoints or {},
            status=_status(state),
            batches_into_epoch=state.batch_in_epoch,
        )

    def trained_until(self, failed: StepRecord) -> None:
        """Count what was trained up to the update before `failed` (a non-finite one found
        later, where the run read its steps back): that is what the run has to show."""
        self.global_step = failed.step - 1
        self.epochs_completed = failed.epoch - 1
        self.batches_into_epoch = failed.batch_index

    def trained_words(self) -> str:
        """The epochs and updates trained, in words (see `trained_words`)."""
        return trained_words(self.epochs_completed, self.batches_into_epoch, self.global_step)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(f"no result named {key!r}; available: {', '.join(self._keys())}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._keys()}

    def write_summary(
        self, job: Distributed, status: str | None = None, reason: str | None = None
    ) -> None:
        """`summary.json` in the run's folder: the result without its history; `status` and
        `reason` override a run that did not finish (rank 0 writes)."""
        summary = {k: v for k, v in self.to_dict().items() if k != "training_history"}
        if status is not None:
            summary["status"], summary["stop_reason"] = status, reason
        if job.is_main:
            atomic_write_json(Path(self.output_dir) / "summary.json", summary)


def _status(state: TrainState) -> str:
    """How the loop ended, for `TrainingResult.status`."""
    if state.timed_out:
        return "time limit"
    return "stopped early" if state.stopped_early else "finished"


def counted(n: int, word: str, plural: str | None = None) -> str:
    """`n` and `word`, plural unless `n` is 1: "1 epoch", "3 epochs"."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def trained_words(epochs: int, batches_into_epoch: int, updates: int) -> str:
    """What a run trained: "1 epoch and 12 batches of epoch 2 (40 optimizer updates)"."""
    words = counted(epochs, "epoch")
    if batches_into_epoch:
        part = counted(batches_into_epoch, "batch", "batches")
        words += f" and {part} of epoch {epochs + 1}"
    return f"{words} ({counted(updates, 'optimizer update')})"
