"""An exponential moving average (EMA) of a model's weights, kept beside the trained weights.

After every optimizer update, for each parameter and floating-point buffer w:

    average = decay * average + (1 - decay) * w

the first update copying w (as torch's `AveragedModel` with `get_ema_multi_avg_fn` and
`use_buffers=True` does). With `warmup` the decay of update t (counted from 1) is
`min(decay, (1 + t) / (10 + t))`, so early averages do not cling to the first weights.
Integer buffers (BatchNorm's `num_batches_tracked`) are not averaged: they are the model's.

The loop evaluates with the averaged weights, checkpoints hold them as the model's weights
(the trained ones beside them, to resume), and the model holds them when training ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of `model`'s floating-point parameters and buffers, on their devices.

    Tied weights (one tensor under several state-dict names) are averaged once.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} is invalid: expected a number in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.live: list[torch.Tensor] = []  # the model's own tensors, read in place
        self.index: dict[str, int] = {}  # state-dict name -> position in live / average
        positions: dict[int, int] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            position = positions.setdefault(id(tensor), len(self.live))
            if position == len(self.live):
                self.live.append(tensor.detach())
            self.index[name] = position
        self.average: list[torch.Tensor] | None = None  # made by the first update

    def decay_at(self, update: int) -> float:
        """The decay applied at update `update` (from 1)."""
        if self.warmup:
            return min(self.decay, (1 + update) / (10 + update))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights in (after an optimizer update)."""
        self.updates += 1
        if self.average is None:
            self.average = [tensor.clone() for tensor in self.live]
            return
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(self.average, self.live, weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; its own ones after."""
        if self.average is None:  # no update yet: the average is the weights themselves
            yield
            return
        with torch.no_grad():
            trained = [tensor.clone() for tensor in self.live]
            torch._foreach_copy_(self.live, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, trained)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Make the averaged weights the model's own (at the end of training)."""
        if self.average is not None:
            torch._foreach_copy_(self.live, self.average)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and floating-point buffers by state-dict name (the
        model's own before the first update), e.g. for `torch.func.functional_call`."""
        source = self.average if self.average is not None else self.live
        return {name: source[position] for name, position in self.index.items()}

    def averaged_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` (the model's state dict) with the averaged tensors in place of its own."""
        if self.average is None:
            return state
        average = self.average
        return {
            name: average[self.index[name]].detach() if name in self.index else value
            for name, value in state.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the averaged weights (which are its model's)."""
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    @torch.no_grad()
    def load(self, meta: dict[str, Any], averaged: dict[str, Any]) -> None:
        """Continue from a checkpoint: `meta` from `state_dict`, `averaged` its weights."""
        self.updates = int(meta["updates"])
        if self.updates == 0:
            self.average = None
            return
        average: list[torch.Tensor | None] = [None] * len(self.live)
        for name, position in self.index.items():
            if average[position] is None:
                saved = averaged[name]
                average[position] = saved.to(self.live[position].device, copy=True)
        self.average = [tensor for tensor in average if tensor is not None]
        if len(self.average) != len(self.live):  # pragma: no cover - index covers every tensor
            raise ValueError("the checkpoint's averaged weights do not cover the model")
