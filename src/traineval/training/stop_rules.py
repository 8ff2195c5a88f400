"""When the loop stops before its epochs end, and the sentence that says why.

Four things end a run early: a callback's stop request (early stopping, `stop_when`, a
pruned trial), `max_steps`, the `max_seconds` time limit, and a signal (SIGTERM, Ctrl-C, a
callback's `request_interrupt`). The loop asks at each step boundary (`done`). Under
torchrun the ranks agree on signals and on the time limit at log steps, epoch ends and at
least every `AGREE_SECONDS` of training between them (`agree`, `agree_if_due`), so every
rank stops at the same update, soon after a signal (torchrun kills its workers 30 s after
passing one on); alone, both are seen at once. A
validation that cannot be scored ends the run too (`EvaluationError`), after the training
before it is saved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from ..runs.train_state import TrainState
from ..system.distributed import Distributed
from .stopping import TrainingInterrupted

# Under torchrun the ranks agree on stops at least this often: a signal acts within it (plus
# the update in progress), well inside the 30 s torchrun waits before killing its workers.
AGREE_SECONDS = 2.0


class EvaluationError(ValueError):
    """A validation could not be scored (e.g. the model predicted NaN); the training before
    it was saved as a resumable checkpoint. `user_code`: a metric of the user's raised (it
    fails the same way again until that code changes)."""

    def __init__(self, message: str, user_code: bool = False, reason: str = "") -> None:
        super().__init__(message)
        self.user_code = user_code
        self.reason = reason or message  # why, without where (the step, the checkpoint)

    def __reduce__(self) -> tuple[type[EvaluationError], tuple[str, bool, str]]:
        return type(self), (str(self), self.user_code, self.reason)


class StopRules:
    """The run's stop conditions over `state` (see the module docstring)."""

    def __init__(
        self,
        state: TrainState,
        job: Distributed,
        max_steps: int | None = None,
        max_seconds: float | None = None,
    ) -> None:
        self.state = state
        self.job = job
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.requested = False  # a callback asked to stop (the reason is in the state)
        self.deadline: float | None = None  # time.monotonic() at which max_seconds is up
        self.timed_out = False  # (agreed over the ranks, as signals are)
        self.interrupted: str | None = None  # set by a signal handler
        self.interrupted_during: str | None = None  # the phase the signal arrived in
        self.agreed_signal: str | None = None  # a signal every rank has agreed to stop on
        self.phase = "training"
        # when the ranks last agreed (step, time), and how many updates until they next do
        self._agreed = (0, time.monotonic())
        self._every = 1

    def start(self) -> None:
        """Training starts: the time limit counts from now."""
        self._agreed = (self.state.global_step, time.monotonic())
        if self.max_seconds is not None:
            self.deadline = self._agreed[1] + self.max_seconds

    def request(self, reason: str) -> None:
        """Stop at the next step boundary, for `reason`."""
        self.requested = True
        self.state.stop_reason = reason
        self.state.stopped_early = True  # in every checkpoint from here on

    def done(self) -> bool:
        """Whether to stop at this step boundary: a stop request, max_steps, max_seconds or
        a signal."""
        return self.stopping() or self.signal() is not None or self.timed_out

    def stopping(self) -> bool:
        """Whether the run ends before its epochs do: a stop request or max_steps (a
        signal interrupts it instead)."""
        at_max = self.max_steps is not None and self.state.global_step >= self.max_steps
        return self.requested or at_max

    def signal(self) -> str | None:
        """The signal to stop on: at once alone, once every rank agrees when distributed."""
        return self.agreed_signal if self.job.enabled else self.interrupted

    def signalled(self, name: str) -> None:
        """A signal arrived (the signal watch calls this): stop at the next consistent point."""
        if self.interrupted is None:
            self.interrupted, self.interrupted_during = name, self.phase

    def check_time(self) -> None:
        """Whether max_seconds is up, alone: after each update and each epoch's end with
        epochs left (never before an epoch's first update: a resume would skip it); under
        torchrun where the ranks agree on signals (`agree`)."""
        if self.deadline is None or self.timed_out or self.job.enabled or self.stopping():
            return
        self.timed_out = time.monotonic() >= self.deadline

    def agree_if_due(self, log_step: bool = False) -> None:
        """Distributed: `agree` at a log step, or when `AGREE_SECONDS` of updates have passed
        since the ranks last did (counted in updates, which every rank agreed on, so all
        take part)."""
        if self.job.enabled and (
            log_step or self.state.global_step - self._agreed[0] >= self._every
        ):
            self.agree()

    def agree(self) -> None:
        """Distributed: stop together if any rank was signalled or is out of time (at log
        steps, epoch ends, and when due), in one collective that also sets how many updates
        until the next (`AGREE_SECONDS` at the ranks' mean pace, at most twice the last)."""
        if not self.job.enabled:
            return
        now, (step, then) = time.monotonic(), self._agreed
        pace = (now - then) / max(self.state.global_step - step, 1)  # seconds an update
        # the same on every rank: they all take part
        timing = self.deadline is not None and not self.timed_out and not self.stopping()
        late = self.deadline is not None and timing and now >= self.deadline
        signalled, out_of_time, paces = self.job.sum(
            [float(self.interrupted is not None), float(late), pace]
        )
        if self.agreed_signal is None and signalled:
            self.agreed_signal = self.interrupted or "SIGTERM"
        if timing:
            self.timed_out = bool(out_of_time)
        # at most twice as far as the last time: a pace measured over few updates (the first,
        # before its callbacks ran) is no promise
        due = int(AGREE_SECONDS / max(paces / self.job.world_size, 1e-9))
        self._every = max(1, min(due, 2 * self._every))
        self._agreed = (self.state.global_step, now)

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Name what the loop is doing, for the message of a signal that arrives meanwhile."""
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def time_limit_reason(self, checkpoint: str | None) -> str:
        """The stop reason of a run whose time is up, `checkpoint` holding where it stands."""
        state = self.state
        where = f"epoch {state.epoch}, step {state.global_step}"
        how = (
            f"resume from {checkpoint!r} to continue" if checkpoint else "no checkpoint was written"
        )
        return f"max_time={self.max_seconds:g}s reached at {where}; {how}"

    def interruption(self, checkpoint: str | None) -> TrainingInterrupted:
        """The error that ends a signalled run, `checkpoint` holding where it stands."""
        signal_name = self.signal() or "signal"
        during = f" during {self.interrupted_during}" if self.interrupted_during else ""
        where = f"epoch {self.state.epoch}, step {self.state.global_step}{during}"
        how = (
            f"resume with resume_from={checkpoint!r} (or 'auto')"
            if checkpoint
            else "no checkpoint was written"
        )
        what = f"training interrupted by {signal_name} at {where}"
        return TrainingInterrupted(f"{what}; {how}", checkpoint, signal_name, what)

    def failed_evaluation(
        self,
        reason: str,
        checkpoint: str | None,
        refused: Exception | None = None,
        user_code: bool = False,
    ) -> EvaluationError:
        """The error that ends a run whose validation cannot be scored: `checkpoint` holds the
        training before it; `refused`: why it could not be saved (weights not finite);
        `user_code`: a metric of the user's raised."""
        where = f"validation at epoch {self.state.epoch}, step {self.state.global_step} failed"
        if refused is not None:
            return EvaluationError(
                f"{where}: {reason}; {refused}: resuming from it would come back here; lower "
                "learning_rate, clip gradients (max_grad_norm) or check the data",
                user_code,
                reason,
            )
        saved = (
            f"the training so far is saved in {checkpoint!r}; a resume (resume_from='auto', or "
            "--resume auto) redoes this validation, which fails again unless what made it "
            "fail changes"
            if checkpoint
            else "no checkpoint was written"
        )
        return EvaluationError(f"{where}: {reason}; {saved}", user_code, reason)
