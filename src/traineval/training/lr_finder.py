"""The learning-rate range test (Smith, 2017; fastai's and Lightning's `lr_find`).

Train for up to `num_steps` optimizer updates while the learning rate grows exponentially
from `min_lr` to `max_lr`, record each update's loss, and stop once the smoothed loss
exceeds `divergence` times its best (or a loss is not finite). The updates are the run's own
(`TrainingManager.train` with the config's optimizer, precision, accumulation, clipping and
mode), and the model's weights and the random streams are put back afterwards, so a
training run that follows is the one it would have been without the search.

Two smoothings of the per-update losses: while searching, an exponential moving average
(`smoothing`, with bias correction) decides divergence; afterwards a centred moving
average over 2k+1 updates (k = max(2, updates // 25)) gives `smoothed_losses`, without the
lag of a one-way average (which trails the loss by ~1/(1 - smoothing) updates, half a
decade of rates in a 100-update search) and without letting the last, exploding losses
leak further back than k updates. The suggestion is the rate where that curve falls
fastest against log(lr), before its minimum: a rate to start from, not a promise.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from ..callbacks.base import Callback, Control


@dataclasses.dataclass
class LearningRateSearch:
    """What the range test saw: the rate and loss of each update, smoothed, and a suggestion.

    `stop_reason` says why it ended: "diverged", "non-finite loss" or "completed".
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float | None
    stop_reason: str

    def plot(self, path: str | Path) -> Path:
        """Loss against learning rate (log scale), the suggestion marked."""
        from ..reporting.plots import learning_rate_search

        return learning_rate_search(self, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def centred_average(values: list[float], half: int) -> list[float]:
    """Each value averaged with up to `half` neighbours on either side (fewer at the ends)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def suggest(
    learning_rates: list[float], smoothed: list[float], skip_start: int = 3
) -> float | None:
    """The rate of the steepest descent of `smoothed` against log10(rate), before its
    minimum (and after the first `skip_start` updates, whose average is still settling)."""
    if len(smoothed) <= skip_start + 2:
        return None
    lowest = min(range(skip_start, len(smoothed)), key=smoothed.__getitem__)
    if lowest - skip_start < 2:
        return None
    logs = [math.log10(rate) for rate in learning_rates]
    best, steepest = None, math.inf
    for i in range(skip_start, lowest):
        slope = (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1])
        if slope < steepest:
            best, steepest = i, slope
    return learning_rates[best] if best is not None else None


class RangeTest(Callback):
    """Sets each update's rate (exponential in the update's index) and records its loss.

    Needs the loop to log every update (`log_frequency=1`): the loss is read then.
    """

    def __init__(
        self, min_lr: float, max_lr: float, num_steps: int, divergence: float, beta: float
    ) -> None:
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.divergence, self.beta = divergence, beta
        self.rates: list[float] = []
        self.losses: list[float] = []
        self._running: list[float] = []  # the one-way average, for the divergence test
        self._average = 0.0
        self.stop_reason = "completed"

    @classmethod
    def checked(
        cls, min_lr: Any, max_lr: Any, num_steps: Any, divergence: Any, smoothing: Any
    ) -> RangeTest:
        """The range test, after refusing each bad argument by name, value and rule."""
        if not _finite(min_lr) or min_lr <= 0:
            raise ValueError(f"min_lr={min_lr!r} is invalid: expected a finite number > 0")
        if not _finite(max_lr) or max_lr <= min_lr:
            raise ValueError(
                f"max_lr={max_lr!r} is invalid: expected a finite number > min_lr={min_lr}"
            )
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(
                f"num_steps={num_steps!r} (--steps) is invalid: expected an integer >= 2"
            )
        if (
            isinstance(divergence, bool)
            or not isinstance(divergence, (int, float))
            or divergence <= 1
        ):
            raise ValueError(f"divergence={divergence!r} is invalid: expected a number > 1")
        if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing={smoothing!r} is invalid: expected a number in [0, 1)")
        return cls(float(min_lr), float(max_lr), num_steps, divergence, smoothing)

    def rate(self, update: int) -> float:
        """The rate of update `update` (from 0): min_lr, ..., max_lr at num_steps - 1."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (update / (self.num_steps - 1))

    def on_train_start(self, loop: Control) -> None:
        self._set(loop, self.rate(0))

    def on_log(self, loop: Control, logs: dict[str, Any]) -> None:
        loss = float(logs["train_step_loss"])
        self.rates.append(self.rate(len(self.losses)))
        self.losses.append(loss)
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** len(self.losses))
        self._running.append(smoothed)
        if len(self._running) > 1 and smoothed > self.divergence * min(self._running):
            self.stop_reason = "diverged"
            loop.request_stop(f"the loss diverged at learning rate {self.rates[-1]:.3g}")

    def on_step_end(self, loop: Control) -> None:
        self._set(loop, self.rate(loop.state.global_step))

    @staticmethod
    def _set(loop: Control, rate: float) -> None:
        loop.set_learning_rate(rate)  # lr_multipliers keep their ratios

    def result(self) -> LearningRateSearch:
        smoothed = centred_average(self.losses, max(2, len(self.losses) // 25))
        return LearningRateSearch(
            learning_rates=list(self.rates),
            losses=list(self.losses),
            smoothed_losses=smoothed,
            suggestion=suggest(self.rates, smoothed) if smoothed else None,
            stop_reason=self.stop_reason,
        )


class SearchProgress(Callback):
    """One progress line for the search: updates done of `num_steps`, the rate and loss.
    `enabled=None` shows it only when stderr is a terminal."""

    def __init__(self, num_steps: int, enabled: bool | None = None) -> None:
        self.num_steps = num_steps
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None

    def on_train_start(self, loop: Control) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.num_steps, desc="lr-find", leave=False, file=sys.stderr, unit="update"
            )

    def on_log(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                lr=f"{logs['learning_rate']:.3g}", loss=f"{logs['train_step_loss']:.4f}"
            )

    def on_train_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, loop: Control, error: BaseException) -> None:
        self.on_train_end(loop, {})


def _finite(value: Any) -> bool:
    """A real number, not a bool, NaN or infinity."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value)
