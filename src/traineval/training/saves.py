"""The checkpoints a run's callbacks ask for, and when each is written.

A callback asks (`LoopControl.request_save(name)`) and the loop carries it out once the hook
round is over, after reading every recorded step back (a non-finite one is never saved). A
deferrable request (the epoch-end `last.pt`, `best.pt`) may be put off while checkpoints
would take more than `CHECKPOINT_SHARE` of the run's time (`WriteBudget`, copies counted):
a `last` is then written when the run ends (the state at the end is the one to keep), any
other is copied at once into host memory and written later, within the budget or at the
end, in the order the copies were made. Under torchrun every request is carried out at
once, since every rank must take part in each save alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..runs.checkpoint_writer import StagedWrites, WriteBudget
from ..system.distributed import Distributed

# The share of the training time that deferrable checkpoints (the epoch-end last.pt, best.pt)
# may take, copies kept for later included: 1,000 epochs of 4 updates would otherwise spend
# most of their time writing.
CHECKPOINT_SHARE = 0.04

SaveFn = Callable[..., Any]  # (name, loop) -> path; with a third parameter, it may stage


class Saves:
    """The save requests of one run and the files they wrote; see the module docstring."""

    def __init__(self, save_fn: SaveFn | None, job: Distributed) -> None:
        self.save_fn = save_fn
        self.job = job
        self.budget = WriteBudget(CHECKPOINT_SHARE)
        self.requests: list[str] = []  # written at the next step boundary
        self.staging: list[str] = []  # copied at the next step boundary ...
        self.staged = StagedWrites()  # ... kept here, written within the budget or at the end
        self.deferred: set[str] = set()  # "last": written when the run ends
        # a save_fn that takes a writer can put a save off (a copy written later)
        self.can_stage = save_fn is not None and len(inspect.signature(save_fn).parameters) > 2
        self.last: tuple[Any, tuple[int, ...]] | None = None  # `last`'s path and position
        self.export_refusal_said = False  # why best.safetensors is not written, said once

    def request(self, name: str, *, deferrable: bool, within_budget: bool) -> None:
        """Ask for `name`; a `deferrable` one beyond the budget is put off (see above)."""
        if deferrable and not within_budget:
            if name == "last":
                self.deferred.add(name)
                return
            if self.can_stage:
                if name not in self.staging:
                    self.staging.append(name)
                return
        if name not in self.requests:
            self.requests.append(name)

    def within_budget(self) -> bool:
        """Whether another write now keeps checkpoints within the budget (always under
        torchrun)."""
        return self.job.enabled or self.budget.allows()

    def take(self) -> tuple[list[str], list[str]]:
        """The requests to carry out now (to write, to copy), cleared; none without a
        save function."""
        requests, staging = self.requests, self.staging
        self.requests, self.staging = [], []
        return (requests, staging) if self.save_fn is not None else ([], [])

    def carry_out(self, requests: list[str], staging: list[str], loop: Any) -> None:
        """Write `requests` (replacing put-off copies of the same names, after writing the
        other put-off ones), then copy `staging` to write later."""
        assert self.save_fn is not None
        if requests:
            for name in requests:
                self.staged.drop(name)
            self.write_staged()
        for name in requests:
            self.save(name, loop, None)
        for name in staging:
            with self.budget.charge(write=False):
                self.save_fn(name, loop, self.staged)

    def write_staged(self) -> None:
        """Write the saves that were put off, in the order they were made."""
        if self.staged.pending:
            with self.budget.charge(write=True):
                self.staged.write_all()

    def save(self, name: str, loop: Any, position: tuple[int, ...] | None) -> Any:
        """Write `name` now; a `last` remembers where the run was (`position`)."""
        assert self.save_fn is not None
        with self.budget.charge(write=True):
            path = self.save_fn(name, loop)
        self.deferred.discard(name)
        if name == "last":
            self.last = (path, position or loop.position())
        return path

    def holding_last(self, position: tuple[int, ...]) -> Any:
        """The `last` file already written at `position`, if any."""
        return self.last[0] if self.last is not None and self.last[1] == position else None

    def finish(self) -> None:
        """The run ends: the put-off `last` is asked for now."""
        if self.deferred and self.save_fn is not None:
            self.requests += sorted(self.deferred)

    def forget_last(self) -> None:
        """Drop a pending request for `last`, asked now or put off to the run's end (the
        resume point was just written: a later `last` would hold what came after it)."""
        self.requests = [name for name in self.requests if name != "last"]
        self.deferred.discard("last")
