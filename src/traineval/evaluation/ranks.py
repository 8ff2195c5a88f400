"""Evaluating on several ranks: each rank's batches (in lockstep for a model whose forward
is a collective), and every rank's metric state merged in rank order, so every rank computes
the metrics of all samples, each counted once."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..system.distributed import CollectiveError, Distributed
from ..training.exit_codes import UserCodeError, failure_line
from ..training.stopping import TrainingInterrupted
from .accumulator import Accumulator
from .user_metrics import UserMetric

_SPENT = object()  # what a spent loader's iterator gives


class RankBatches:
    """The batches of an evaluation on one rank, each with whether it is real; in lockstep
    across `job`'s ranks where given (a model whose forward is a collective: FSDP).

    In lockstep, every rank makes as many forward passes as the one with the most batches
    (its last batch again, marked not real), and before each one the ranks agree whether
    one of them has failed: a batch's work runs inside `guard()`, which keeps this rank's
    own error (`failure`) instead of raising it, so that every rank leaves the loop at the
    same batch and none waits in a forward's collective for a rank that left (it waited for
    the collective timeout). Alone, or without lockstep, an error is raised at once."""

    def __init__(self, loader: Iterable[Any], job: Distributed | None) -> None:
        self.loader = loader
        self.job = job if job is not None and job.enabled else None
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        if self.job is None:
            return ((batch, True) for batch in self.loader)
        return self._lockstep(self.job)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Inside, one batch's work: in lockstep, this rank's own error is kept for the
        ranks to agree on before the next batch."""
        try:
            yield
        except Exception as error:
            if self.job is None or not this_ranks_own(error):
                raise
            self.failure = error

    def raise_failure(self) -> None:
        """After the loop: this rank's kept error, if it had one."""
        if self.failure is not None:
            raise self.failure

    def _lockstep(self, job: Distributed) -> Iterator[tuple[Any, bool]]:
        try:
            count = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "evaluating a sharded (FSDP) model needs a loader with len(), so the ranks "
                "can step together"
            ) from None
        counts = job.gather(count)
        if max(counts) and min(counts) == 0:
            raise ValueError(
                f"evaluating a sharded (FSDP) model needs a batch on every rank; the ranks "
                f"have {counts} batches (fewer samples than ranks?)"
            )
        last, mine, spent = None, iter(self.loader), False
        for _ in range(max(counts)):
            if job.any(self.failure is not None):
                return  # a rank failed: every rank stops here, to merge (and say) it
            batch = _SPENT if spent else next(mine, _SPENT)
            spent = batch is _SPENT
            if not spent:
                last = batch
                yield batch, True
            else:  # spent (a loader shorter than its len() too): in step, not scored
                yield last, False
        if not spent and next(mine, _SPENT) is not _SPENT and self.failure is None:
            self.failure = ValueError(
                f"the evaluation loader yielded more batches than its len() ({count}): in "
                "lockstep every rank makes len() forward passes; the rest would be left out"
            )


class RankFailed(ValueError):
    """A rank's evaluation failed (its forward, or a metric's update): every rank raises it,
    with the same words, so that none waits for the others in a collective."""


class RankFailedInUserCode(RankFailed, UserCodeError):
    """A `RankFailed` where a metric of the user's raised on that rank: every rank's exit
    status says bad input, as the failing rank's would alone."""


def merge_ranks(
    job: Distributed, accumulator: Accumulator | None, text: Any, failure: Exception | None
) -> tuple[Accumulator | None, Any]:
    """Every rank's metric state, merged in rank order: the same result on every rank; a
    rank's `failure` (its evaluation could not finish) is every rank's `RankFailed`."""
    said = None if failure is None else (failure_line(failure), isinstance(failure, UserCodeError))
    parts = job.gather((_on_cpu(accumulator), text, said))
    failed = [(rank, said) for rank, (_, _, said) in enumerate(parts) if said is not None]
    if failed:
        rank, (line, theirs) = failed[0]
        kind = RankFailedInUserCode if theirs else RankFailed
        raise kind(f"rank {rank}: {line}") from failure
    merged: Accumulator | None = None
    merged_text = None
    for part, part_text, _ in parts:
        if part is not None:
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        if part_text is not None:
            if merged_text is None:
                merged_text = part_text
            else:
                merged_text.merge(part_text)
    return merged, merged_text


def this_ranks_own(error: Exception) -> bool:
    """Whether `error` may be this rank's alone: anything but a failed collective (the
    others saw it too) and a stop (the ranks agree on stops themselves)."""
    return not isinstance(error, (CollectiveError, TrainingInterrupted))


def _on_cpu(value: Any) -> Any:
    """A copy of a metric state with its tensors on the CPU (to send to other ranks)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    if isinstance(value, UserMetric):
        return value.to_cpu()
    if hasattr(value, "merge"):  # Accumulator and the metric states it holds
        clone = copy.copy(value)
        for key, item in vars(value).items():
            setattr(clone, key, _on_cpu(item))
        return clone
    return value
