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


def say(line: str) -> None:
    """A line of the run's progress, for a person: through logging (logger "traineval", at
    INFO) where the program has set logging up (the command line does; so may a user), else
    straight to stderr, so that `train()` in a script or a notebook shows its epochs without
    any setup (as Keras and Lightning do)."""
    log = logging.getLogger("traineval")
    if log.hasHandlers():
        log.info("%s", line)
    else:
        print(line, file=sys.stderr, flush=True)


class EpochSummary(Callback):
    """One line per epoch (losses, validation metrics, learning rate, time; `*` marks the
    best so far), and the reason a run stopped early; see `say` for where lines go.

    `every_seconds`: inside an epoch, also a line at the first log step at least that long
    after the previous line (for a log file or a terminal without the bar: nohup, SLURM,
    CI); None: epoch lines only.
    """

    def __init__(self, every_seconds: float | None = None) -> None:
        self.every_seconds = every_seconds
        self._started = self._said = 0.0

    def on_epoch_start(self, loop: Control) -> None:
        self._started = self._said = time.perf_counter()

    def on_log(self, loop: Control, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.every_seconds is None or now - self._said < self.every_seconds:
            return
        self._said = now
        state, total = loop.state, loop.updates_per_epoch
        step = f"update {state.global_step}" + (f", {total} an epoch" if total else "")
        rate = logs.get("samples_per_sec")
        say(
            f"epoch {state.epoch}/{loop.num_epochs}  {step}  loss {logs['train_step_loss']:.4f}"
            f"  lr {logs['learning_rate']:.3g}"
            + (f"  {rate:,.0f} samples/s" if rate else "")
            + f"  ({now - self._started:.0f}s)"
        )

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        self._said = time.perf_counter()
        parts = [f"train_loss {logs['train_loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in logs.items() if k.startswith("val_")]
        marker = " *" if loop.state.best_epoch == loop.state.epoch else ""
        say(
            f"epoch {loop.state.epoch}/{loop.num_epochs}  {'  '.join(parts)}  "
            f"lr {logs['learning_rate']:.3g}  ({self._said - self._started:.1f}s){marker}"
        )

    def on_train_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if loop.state.stop_reason:
            say(loop.state.stop_reason)
