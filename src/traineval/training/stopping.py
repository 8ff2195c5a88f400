"""How a run stops on a signal: one watch for the whole command, whatever phase it is in.

SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) do not stop the process where they
land: the watch records the first one and tells its listeners (the training loop, which
stops at its next consistent point and saves a resumable checkpoint); the phases after
training (the test evaluation, the report) look at the watch before they write anything
and stop as interrupted instead of reporting a finished run. A second signal stops at once
(`KeyboardInterrupt`), keeping the checkpoints already written.

Watches nest: the experiment's watch spans training and testing, the training manager's
joins it, so one signal is seen by every phase once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "SignalWatch",
    "Stopped",
    "TrainingInterrupted",
    "exit_status",
    "received",
    "signal_name_of",
    "stop_if_signalled",
    "watching_signals",
]

logger = logging.getLogger("traineval")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal (or a callback's `request_interrupt`) after saving a
    resumable checkpoint; `checkpoint` is its path (None when none could be written)."""

    def __init__(
        self, message: str, checkpoint: str | None, signal_name: str, what: str | None = None
    ) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signal_name = signal_name
        self.what = what or message  # what happened, without the advice


class Stopped(KeyboardInterrupt):
    """A signal that stops the command at once, named (`signal_name`): a second signal
    during a run, or one outside a run's own handling (a command's start or end)."""

    def __init__(self, signal_name: str, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal_name}")
        self.signal_name = signal_name


def signal_name_of(stopped: BaseException) -> str:
    """The signal that stopped the command (`Stopped`, `TrainingInterrupted`); a bare
    KeyboardInterrupt is Ctrl-C's."""
    return str(getattr(stopped, "signal_name", "SIGINT"))


def exit_status(signal_name: str) -> int:
    """The shell's exit status for a run stopped by `signal_name`: 128 + its number (130 for
    SIGINT, 143 for SIGTERM), what batch schedulers read as 'requeue me'."""
    return 128 + int(getattr(signal, signal_name, signal.SIGINT))


class SignalWatch:
    """The first signal the command received (`received`), and who is told of it."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.listeners: list[Callable[[str], None]] = []

    def receive(self, name: str) -> None:
        """Record `name` (the first signal) and tell the listeners."""
        self.received = name
        logger.warning("%s received: stopping at the next consistent point", name)
        for listener in list(self.listeners):
            listener(name)

    def stop_if_received(self, checkpoint: str | None, during: str) -> None:
        """Raise `TrainingInterrupted` if a signal arrived: the phase `during` does not
        write its results; `checkpoint` is where the run resumes from."""
        if self.received is None:
            return
        what = f"interrupted by {self.received} during {during}"
        how = (
            f"resume from {checkpoint!r} (resume_from='auto', or --resume auto)"
            if checkpoint
            else "no checkpoint was written"
        )
        raise TrainingInterrupted(f"{what}; {how}", checkpoint, self.received, what)


def stop_if_signalled(checkpoint: str | None, during: str) -> None:
    """Raise `TrainingInterrupted` if the open watch saw a signal (see
    `SignalWatch.stop_if_received`); nothing without an open watch."""
    if _active is not None:
        _active.stop_if_received(checkpoint, during)


_active: SignalWatch | None = None


def received() -> str | None:
    """The signal the open watch saw (None: no signal, or no watch open)."""
    return _active.received if _active is not None else None


@contextlib.contextmanager
def watching_signals(listener: Callable[[str], None] | None = None) -> Iterator[SignalWatch]:
    """Watch for SIGTERM and SIGINT in the block (joining a watch already open).

    `listener(name)` is called on the first signal, at once if it came before the block.
    Only the main thread installs handlers; elsewhere the watch never fires.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield SignalWatch()
        return
    outer = _active
    watch = outer if outer is not None else SignalWatch()
    if listener is not None:
        watch.listeners.append(listener)
        if watch.received is not None:
            listener(watch.received)
    previous: dict[int, Any] = {}
    if outer is None:
        previous = {sig: signal.signal(sig, _handler(watch)) for sig in SIGNALS}
        _active = watch
    try:
        yield watch
    finally:
        if listener is not None:
            watch.listeners.remove(listener)
        if outer is None:
            _active = None
            for sig, old in previous.items():
                signal.signal(sig, old)


def _handler(watch: SignalWatch) -> Callable[[int, Any], None]:
    installed_by = os.getpid()

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != installed_by:  # a forked DataLoader worker, which the run stops
            return
        name = signal.Signals(signum).name
        if watch.received is not None:
            raise Stopped(name, f"second {name}: stopping at once")
        watch.receive(name)

    return handle
