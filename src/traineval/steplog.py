"""Per-step losses and gradient norms, kept on the device and read in batches.

Writing one step's loss into a preallocated device buffer costs one device op and no sync.
The loop reads the buffer when it logs, evaluates or saves (it syncs then anyway): that read
yields every step's loss for logging and the epoch mean, and finds the first non-finite loss
or gradient norm, so the error names the exact step even though nothing synced per step.
"""

from __future__ import annotations

import dataclasses
import math

import torch


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; no checkpoint was written after it."""


@dataclasses.dataclass
class StepRecord:
    """One optimizer step as read back from the device."""

    step: int
    epoch: int
    batch_index: int  # the micro-batch index within the epoch where the step's window starts
    loss_sum: float  # item-weighted loss summed over the window
    weight: float  # items in the window
    grad_norm: float | None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.weight if self.weight else math.nan


class StepLog:
    """Device buffers of the steps since the last `flush()`."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.losses = torch.zeros(self.capacity, device=device)
        self.norms = torch.zeros(self.capacity, device=device)
        self.device_weights = torch.zeros(self.capacity, device=device)
        self.meta: list[tuple[int, int, int, int, bool]] = []  # step, epoch, batch, weight, norm?
        self._uses_device_weights = False
        self._open = False
        self._pending_weight = 0

    @property
    def counts_tokens(self) -> bool:
        """Whether steps are weighted by token counts (a token-level loss)."""
        return self._uses_device_weights

    @property
    def full(self) -> bool:
        return len(self.meta) >= self.capacity

    def add_micro_batch(self, loss: torch.Tensor, weight: int | torch.Tensor) -> None:
        """Add a micro-batch's mean loss times its weight to the open step."""
        i = len(self.meta)
        if isinstance(weight, torch.Tensor):
            self._uses_device_weights = True
            if self._open:
                self.losses[i].add_(loss * weight)
                self.device_weights[i].add_(weight)
            else:
                torch.mul(loss, weight, out=self.losses[i])
                self.device_weights[i].copy_(weight)
            self._pending_weight = 0
        elif self._open:
            self.losses[i].add_(loss, alpha=weight)
            self._pending_weight += weight
        else:
            torch.mul(loss, weight, out=self.losses[i])
            self._pending_weight = weight
            if self._uses_device_weights:
                self.device_weights[i].zero_()
        self._open = True

    def close_step(
        self, step: int, epoch: int, batch_index: int, grad_norm: torch.Tensor | None
    ) -> None:
        """Seal the open step (after its optimizer update)."""
        i = len(self.meta)
        if grad_norm is not None:
            self.norms[i].copy_(grad_norm)
        self.meta.append((step, epoch, batch_index, self._pending_weight, grad_norm is not None))
        self._open = False

    def discard_step(self) -> None:
        """Forget the open step (a skipped update)."""
        self._open = False

    def flush(self) -> list[StepRecord]:
        """Read the sealed steps back (one sync) and empty the buffer."""
        n = len(self.meta)
        if n == 0:
            return []
        losses = self.losses[:n].tolist()
        norms = self.norms[:n].tolist()
        device_weights = (
            self.device_weights[:n].tolist() if self._uses_device_weights else [0.0] * n
        )
        records = [
            StepRecord(
                step=step,
                epoch=epoch,
                batch_index=batch,
                loss_sum=losses[i],
                weight=host_weight + device_weights[i],
                grad_norm=norms[i] if has_norm else None,
            )
            for i, (step, epoch, batch, host_weight, has_norm) in enumerate(self.meta)
        ]
        self.meta.clear()
        return records


def first_non_finite(records: list[StepRecord]) -> StepRecord | None:
    """The earliest step whose loss or gradient norm is NaN or infinite."""
    for record in records:
        if not math.isfinite(record.loss_sum) or (
            record.grad_norm is not None and not math.isfinite(record.grad_norm)
        ):
            return record
    return None


def describe(record: StepRecord) -> str:
    what = (
        f"loss {record.loss}"
        if not math.isfinite(record.loss_sum)
        else f"gradient norm {record.grad_norm}"
    )
    return (
        f"non-finite {what} at epoch {record.epoch}, step {record.step} (the optimizer update "
        f"whose window starts at batch {record.batch_index} of the epoch)"
    )
