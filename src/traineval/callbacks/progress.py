"""A tqdm progress bar that redraws on its own timer and never waits for the device."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from .base import Callback, Control

logger = logging.getLogger("traineval")


class ProgressBar(Callback):
    """One bar per epoch, counting optimizer updates.

    The postfix (loss, LR) changes only when the loop logs, since reading the loss is a sync.
    `enabled=None` shows the bar only when stderr is a terminal.
    """

    def __init__(self, enabled: bool | None = None, refresh_seconds: float = 0.25) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.refresh_seconds = refresh_seconds
        self.bar: Any = None

    def on_epoch_start(self, loop: Control) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        total = loop.updates_per_epoch
        self.bar = tqdm(
            total=total,
            desc=f"Epoch {loop.state.epoch}/{loop.num_epochs}",
            mininterval=self.refresh_seconds,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def on_step_end(self, loop: Control) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{logs['train_step_loss']:.4f}", lr=f"{logs['learning_rate']:.3g}"
            )

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_epoch_end

    def on_exception(self, loop: Control, error: BaseException) -> None:
        if self.bar is not None:  # the interruption's message gets a line of its own
            self.bar.close()
            self.bar = None


class BarAwareHandler(logging.StreamHandler):
    """A log handler that writes above a live progress bar (`tqdm.write`) instead of onto
    its line, so a warning such as "SIGINT received" reads as a line of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        if not getattr(tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


class EpochSummary(Callback):
    """Log one line per epoch (losses, monitored metrics, time) at INFO level."""

    def __init__(self) -> None:
        self._started = 0.0

    def on_epoch_start(self, loop: Control) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        parts = [f"train_loss {logs['train_loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items() if k.startswith("val_")]
        marker = " *" if loop.state.best_epoch == loop.state.epoch else ""
        logger.info(
            "epoch %d/%d  %s  lr %.3g  (%.1fs)%s",
            loop.state.epoch,
            loop.num_epochs,
            "  ".join(parts),
            logs["learning_rate"],
            time.perf_counter() - self._started,
            marker,
        )

    def on_train_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if loop.state.stop_reason:
            logger.info("%s", loop.state.stop_reason)
