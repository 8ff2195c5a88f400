"""Skipping updates that are not finite (`skip_non_finite`), as if they had not happened.

With a limit of N > 0 an update whose loss or gradient is not finite is skipped: the
window's forward passes updated the model's buffers (BatchNorm's running statistics and
counters), so they are copied before each window and put back; a GradScaler forgets the
unscaling without lowering its scale. More than N skipped in a row stop the run. With 0
(the default) nothing is copied, and the first non-finite step stops the run when its log
is read (`TrainLog.read`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..runs.train_state import TrainState
from .steplog import NonFiniteError, StepLog


class NonFiniteSkips:
    """The skip policy for `model`, allowing `limit` non-finite updates in a row."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        self.model = model
        self.limit = limit
        self._buffers: list[torch.Tensor] = []  # the model's buffers, and their values
        self._backups: list[torch.Tensor] = []  # before the window

    def before_window(self) -> None:
        """Copy the model's buffers into backups kept for the run (only with a limit)."""
        if not self.limit:
            return
        buffers = list(self.model.buffers())
        if [id(b) for b in buffers] != [id(b) for b in self._buffers]:  # new: reallocate
            self._buffers = buffers
            self._backups = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._backups, buffers)

    def finite(self, steps: StepLog, norm: torch.Tensor | None) -> bool:
        """Whether the open step is finite (a sync: asked only with a limit)."""
        return steps.open_step_finite() and (norm is None or bool(torch.isfinite(norm)))

    def undo(self, scaler: Any) -> None:
        """Put the buffers back as they were before the window; clear the GradScaler's
        record of the unscaling without lowering its scale."""
        with torch.no_grad():
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._backups)
        if scaler is not None:
            kept = scaler.state_dict()
            scaler.update()  # forgets the unscale_ (and lowers the scale, undone next)
            scaler.load_state_dict(kept)

    def count(self, state: TrainState, why: str) -> None:
        """Count a skipped update in `state`; too many non-finite ones in a row stop."""
        state.skipped_steps += 1
        if not why.startswith("non-finite"):
            return
        state.consecutive_non_finite += 1
        if state.consecutive_non_finite > self.limit:
            raise NonFiniteError(
                f"{state.consecutive_non_finite} optimizer steps in a row had a non-finite "
                f"loss or gradient (epoch {state.epoch}, after step {state.global_step}); "
                f"the limit is {self.limit}"
            )
