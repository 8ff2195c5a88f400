"""A step function's own state, watched where it cannot be saved.

A step with `state_dict()` / `load_state_dict()` is checkpointed (each rank's) and put back
on resume. A step of yours without them whose plain attributes (numbers, strings, tensors:
a counter, a curriculum's position, a queue) change while training resumes with them as
they started, so the resumed run is not the uninterrupted one: `StepWatch` says so once,
at the first checkpoint after such a change, naming the attributes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

WATCHED_ELEMENTS = 1_000_000  # tensors larger than this are not copied to be compared


class StepWatch:
    """What `step`'s plain attributes were when training started (a user's step without
    `state_dict`; nothing otherwise)."""

    def __init__(self, step: Any) -> None:
        self.step = step
        own = type(step).__module__.startswith("traineval.")
        saved = callable(getattr(step, "state_dict", None))
        self.start = {} if own or saved else _plain(step)
        self.said = False

    def check(self) -> None:
        """Warn once where an attribute changed since training started."""
        if self.said or not self.start:
            return
        now = _plain(self.step)
        changed = [name for name, value in self.start.items() if not _same(value, now.get(name))]
        if changed:
            self.said = True
            logger.warning(
                "%s's %s changed during training, and %s has no state_dict(): a resume "
                "starts it as it was, so the resumed run will differ from an uninterrupted "
                "one; give the step state_dict() and load_state_dict() (they are saved per "
                "rank in every checkpoint)",
                type(self.step).__name__,
                ", ".join(changed),
                type(self.step).__name__,
            )


def _plain(step: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in vars(step).items() if hasattr(step, "__dict__") else ():
        if isinstance(value, bool | int | float | str):
            values[name] = value
        elif _watched_tensor(value):
            values[name] = value.detach().clone()
    return values


def _watched_tensor(value: Any) -> bool:
    """A tensor of the step's own (not a parameter or a model's tensor it trains, which
    the checkpoint holds), small enough to copy."""
    return (
        isinstance(value, torch.Tensor)
        and not isinstance(value, torch.nn.Parameter)
        and not value.requires_grad
        and value.numel() <= WATCHED_ELEMENTS
    )


def _same(before: Any, now: Any) -> bool:
    """Whether an attribute is as it started; of another type or shape it is not."""
    if type(before) is not type(now):
        return False
    if isinstance(before, torch.Tensor):
        return before.shape == now.shape and torch.equal(before, now.detach().to(before.device))
    return bool(before == now)
