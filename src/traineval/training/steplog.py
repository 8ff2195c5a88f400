"""Per-step losses and gradient norms, kept on the device and read in batches.

Recording a step launches no device work and syncs nothing: the step's (detached) loss and
gradient-norm tensors are only kept. The loop reads them when it logs, evaluates or saves
(it syncs then anyway) with one `stack` per kind: that read yields every step's loss for
logging and the epoch mean, and finds the first non-finite loss or gradient norm, so the
error names the exact step even though nothing synced per step.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .steps import items_of


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; no checkpoint was written after it.
    `step`: the failing optimizer update's record, where one update is to blame."""

    def __init__(self, message: str, step: StepRecord | None = None) -> None:
        super().__init__(message)
        self.step = step


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
    """The steps since the last `flush()`: their micro-batch losses, weights and norms."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.device = device
        self._losses: list[torch.Tensor] = []  # micro-batch mean losses, 0-d, detached
        self._weights: list[int | torch.Tensor] = []  # the items each mean is over
        self._norms: list[torch.Tensor] = []
        self.meta: list[tuple[int, int, int, int, bool]] = []  # step, epoch, batch, micro, norm?
        self._open = 0  # micro-batches of the step not sealed yet
        self._uses_device_weights = False

    @property
    def counts_tokens(self) -> bool:
        """Whether steps are weighted by token counts (a token-level loss)."""
        return self._uses_device_weights

    @property
    def full(self) -> bool:
        return len(self.meta) >= self.capacity

    def add_micro_batch(self, loss: torch.Tensor, weight: int | torch.Tensor) -> None:
        """Add a micro-batch's mean loss and its weight to the open step."""
        if isinstance(weight, torch.Tensor):
            self._uses_device_weights = True
        self._losses.append(loss)
        self._weights.append(weight)
        self._open += 1

    def open_losses(self) -> list[torch.Tensor]:
        """The open step's micro-batch losses."""
        return self._losses[len(self._losses) - self._open :]

    def open_step_finite(self) -> bool:
        """Whether every micro-batch loss of the open step is finite, or over no items (a
        micro-batch whose every target is ignored has a NaN mean and no gradient): a sync."""
        losses = self.open_losses()
        finite = torch.isfinite(torch.stack(losses))
        if bool(finite.all()):
            return True
        weights = self._weights[len(self._weights) - self._open :]
        return all(ok or items_of(w) == 0 for ok, w in zip(finite.tolist(), weights, strict=True))

    def close_step(
        self, step: int, epoch: int, batch_index: int, grad_norm: torch.Tensor | None
    ) -> None:
        """Seal the open step (after its optimizer update)."""
        if grad_norm is not None:
            self._norms.append(grad_norm.detach())
        self.meta.append((step, epoch, batch_index, self._open, grad_norm is not None))
        self._open = 0

    def discard_step(self) -> None:
        """Forget the open step (a skipped update)."""
        if self._open:
            del self._losses[-self._open :]
            del self._weights[-self._open :]
        self._open = 0

    def flush(self) -> list[StepRecord]:
        """Read the sealed steps back (one sync) and forget them."""
        if not self.meta:
            return []
        sealed = len(self._losses) - self._open
        losses = torch.stack([loss.float() for loss in self._losses[:sealed]]).tolist()
        weights: list[float] = [float(w) if isinstance(w, int) else 0.0 for w in self._weights]
        on_device = [i for i in range(sealed) if isinstance(self._weights[i], torch.Tensor)]
        if on_device:
            read = torch.stack([self._weights[i] for i in on_device]).tolist()  # type: ignore[misc]
            for i, value in zip(on_device, read, strict=True):
                weights[i] = float(value)
        for i in range(sealed):
            if not math.isfinite(losses[i]):  # over no items (every target ignored)?
                weights[i] = items_of(self._weights[i])
        norms = iter(torch.stack(self._norms).float().tolist() if self._norms else [])
        records = []
        first = 0
        for step, epoch, batch, micro, has_norm in self.meta:
            span = range(first, first + micro)
            first += micro
            records.append(
                StepRecord(
                    step=step,
                    epoch=epoch,
                    batch_index=batch,
                    loss_sum=sum(losses[i] * weights[i] for i in span if weights[i]),
                    weight=sum(weights[i] for i in span),
                    grad_norm=next(norms) if has_norm else None,
                )
            )
        del self._losses[:sealed]
        del self._weights[:sealed]
        self._norms.clear()
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
