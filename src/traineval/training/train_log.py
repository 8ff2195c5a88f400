"""What the loop's steps leave for the log, and the `train` record made of it at a log step.

Each micro-batch adds its detached loss and weight (`StepLog`, on the device: no sync) and
the step function's metrics (kept as given, tensors included); a log step, a checkpoint or
the epoch's end reads them back once (`read`: one transfer), refuses a non-finite step, and
sums them into the run's `TrainState`; `record` turns the interval's sums into the `train`
record (loss, learning rate, throughput, gradient norms before clipping, the step
function's metrics, per-layer gradient norms when asked for), summed over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..runs.train_state import TrainState
from ..system.distributed import Distributed
from .steplog import NonFiniteError, StepLog, StepRecord, describe, first_non_finite


class TrainLog:
    """The open interval's step records and metrics; see the module docstring."""

    def __init__(
        self,
        steps: StepLog,
        named: Sequence[tuple[str, torch.Tensor]],
        job: Distributed,
        layer_norms: bool = False,
    ) -> None:
        """`named`: the optimizer's parameters with their names (per-layer norms, when
        `layer_norms`, are logged as `layer_grad_norm_<name>`)."""
        self.steps = steps
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.job = job
        self.layer_norms = layer_norms
        self._metrics: dict[str, list[float | torch.Tensor]] = {}  # not read yet
        self._layers: torch.Tensor | None = None  # the next log step's per-layer norms

    def add(self, loss: torch.Tensor, weight: Any, metrics: dict[str, Any] | None) -> None:
        """One micro-batch's loss (detached), weight and metrics."""
        self.steps.add_micro_batch(loss.detach(), weight)
        for name, value in (metrics or {}).items():  # kept as given: read at the log step
            self._metrics.setdefault(name, []).append(value)

    def measure_layers(self) -> None:
        """Each parameter's gradient norm, on the device, for the coming log record (under
        FSDP the squared norms of the shards are summed over the ranks: one all-reduce)."""
        if not self.layer_norms:
            return
        grads = [
            p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.params
        ]
        if not any(hasattr(g, "to_local") for g in grads):
            self._layers = torch.stack(torch._foreach_norm(grads))
            return
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        squares = torch.stack(torch._foreach_norm(local)).square()
        self.job.sum_in_place([squares], "summing per-layer gradient norms over the ranks")
        self._layers = squares.sqrt()

    def read(self, state: TrainState) -> list[StepRecord]:
        """Read the recorded steps back into `state`; stop on the first non-finite one."""
        records = self.steps.flush()
        bad = first_non_finite(records)
        if bad is not None:
            raise NonFiniteError(describe(bad) + "; no checkpoint was written after it", bad)
        for name, values in self._metrics.items():
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            total = sum(float(v) for v in values if not isinstance(v, torch.Tensor))
            if tensors:  # one transfer; float32 values summed in float64, so that however a
                # stop splits an interval into reads, the sum is the uninterrupted one's
                # (exactly where the values' magnitudes lie within 2^29 of each other)
                stacked = torch.stack([t.detach().float() for t in tensors])
                total += float(stacked.to("cpu", torch.float64).sum())
            sums = state.interval_metrics.setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += len(values)
        self._metrics = {}
        for record in records:
            state.epoch_loss_sum += record.loss_sum
            state.epoch_loss_weight += record.weight
            state.interval_loss_sum += record.loss_sum
            state.interval_loss_weight += record.weight
            if record.grad_norm is not None:
                state.interval_norms.append(record.grad_norm)
        return records

    def record(
        self, state: TrainState, stats: dict[str, float], lr: float, max_grad_norm: float | None
    ) -> dict[str, Any]:
        """The interval's `train` record (read first), summed over the ranks; the interval's
        sums in `state` start again."""
        # Summed over ranks: the loss of everything trained on, and the job's throughput.
        loss_sum, weight, samples_per_sec = self.job.sum(
            [state.interval_loss_sum, state.interval_loss_weight, stats["samples_per_sec"]]
        )
        state.interval_loss_sum = state.interval_loss_weight = 0.0
        record: dict[str, Any] = {
            "train_step_loss": loss_sum / weight if weight else math.nan,  # NaN: no items
            "learning_rate": lr,
            **stats,
            "samples_per_sec": samples_per_sec,
        }
        if self.steps.counts_tokens and stats.get("seconds"):
            record["tokens_per_sec"] = weight / stats["seconds"]
        norms, state.interval_norms = state.interval_norms, []
        if norms:
            # norms before clipping: of every step when clipping, else of the log step alone
            record["grad_norm"] = norms[-1]
            record["grad_norm_mean"] = sum(norms) / len(norms)
            record["grad_norm_max"] = max(norms)
            if max_grad_norm is not None:
                clipped = sum(norm > max_grad_norm for norm in norms)
                record["clip_fraction"] = clipped / len(norms)
        if state.interval_metrics:  # means over the interval's micro-batches (and ranks)
            names = sorted(state.interval_metrics)
            sums = self.job.sum([v for name in names for v in state.interval_metrics[name]])
            for i, name in enumerate(names):
                record[f"train_{name}"] = sums[2 * i] / max(sums[2 * i + 1], 1.0)
            state.interval_metrics = {}
        layers, self._layers = self._layers, None
        if layers is not None:
            values = layers.tolist()
            record.update(
                {f"layer_grad_norm_{n}": v for n, v in zip(self.names, values, strict=True)}
            )
        if state.skipped_steps:
            record["skipped_steps"] = state.skipped_steps
        return record
