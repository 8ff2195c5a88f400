"""An exponential moving average (EMA) of a model's weights, kept beside the trained weights.

After every optimizer update, for each parameter and floating-point buffer w:

    average = decay * average + (1 - decay) * w

the first update copying w (as torch's `AveragedModel` with `get_ema_multi_avg_fn` and
`use_buffers=True` does). With `warmup` the decay of update t (counted from 1) is
`min(decay, (1 + t) / (10 + t))`, so early averages do not cling to the first weights.
Complex weights are averaged like real ones. Integer buffers (BatchNorm's
`num_batches_tracked`), sparse buffers and modules' extra state are not averaged: they are
the model's.

The loop evaluates with the averaged weights, checkpoints hold them as the model's weights
(the trained ones beside them, to resume), and the model holds them when training ends.

Under FSDP each rank averages its own shards (the local part of each sharded parameter):
no rank gathers the model to average it, and the average takes a rank's share of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..system.devices import inexact
from ..system.distributed import is_sharded, local_part, reshard, sharded_like


class WeightAverage:
    """The EMA of `model`'s floating-point parameters and buffers, on their devices.

    Tied weights (one tensor under several state-dict names) are averaged once. For a
    model FSDP shards, the average of each sharded parameter is this rank's shard of it.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} is invalid: expected a number in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = model
        self.sharded = is_sharded(model)
        self.sources: list[torch.Tensor] = []  # the model's own tensors (parameters: DTensors
        # under FSDP), whose local parts are read in place
        self.index: dict[str, int] = {}  # state-dict name -> position in sources / average
        positions: dict[int, int] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not _averaged(tensor):
                continue  # an integer buffer, a module's extra state (`get_extra_state`)
            position = positions.setdefault(id(tensor), len(self.sources))
            if position == len(self.sources):
                self.sources.append(tensor)
            self.index[name] = position
        self._live = None if self.sharded else [tensor.detach() for tensor in self.sources]
        self.average: list[torch.Tensor] | None = None  # made by the first update

    @property
    def live(self) -> list[torch.Tensor]:
        """The model's tensors, read and written in place: under FSDP each parameter's local
        shard, looked up now (FSDP re-makes a shard's tensor where a load or a device move
        changes it). The DTensor's own local tensor: `to_local` costs an autograd call per
        parameter per step."""
        if self._live is not None:
            return self._live
        return [getattr(tensor, "_local_tensor", tensor).detach() for tensor in self.sources]

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
        self._reshard()  # an FSDP forward then gathers the shards the block puts in place
        with torch.no_grad():
            live = self.live
            trained = [tensor.clone() for tensor in live]
            torch._foreach_copy_(live, self.average)
        try:
            yield
        finally:
            self._reshard()  # no gathered copy of the average outlives the block
            with torch.no_grad():
                torch._foreach_copy_(live, trained)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Make the averaged weights the model's own (at the end of training)."""
        if self.average is not None:
            self._reshard()
            torch._foreach_copy_(self.live, self.average)

    def _reshard(self) -> None:
        """An FSDP model back to its shards: an evaluation pass leaves the root unit's
        parameters gathered, and its next forward would use them rather than the shards."""
        if self.sharded:
            reshard(self.model)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and floating-point buffers by state-dict name (the
        model's own before the first update), e.g. for `torch.func.functional_call`; not
        for a model FSDP shards (whose average is this rank's shards)."""
        if self.sharded:
            raise ValueError(
                "the moving average of a model FSDP shards is kept in shards: it cannot be "
                "called whole (use distributed_strategy='ddp')"
            )
        source = self.average if self.average is not None else self.live
        return {name: source[position] for name, position in self.index.items()}

    def averaged_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` (the model's state dict, or under FSDP its sharded state dict: this
        rank's shards) with the averaged tensors in place of its own, each sharded like
        the entry it replaces."""
        if self.average is None:
            return state
        average = self.average
        return {
            name: sharded_like(value, average[self.index[name]].detach())
            if name in self.index
            else value
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
        live = self.live
        average: list[torch.Tensor | None] = [None] * len(live)
        for name, position in self.index.items():
            if average[position] is None:
                saved = self._local(averaged[name], self.sources[position])
                average[position] = saved.to(live[position].device, copy=True)
        self.average = [tensor for tensor in average if tensor is not None]
        if len(self.average) != len(live):  # pragma: no cover - index covers every tensor
            raise ValueError("the checkpoint's averaged weights do not cover the model")

    @staticmethod
    def _local(saved: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """This rank's part of a saved average: a sharded one's local shard; of a whole one
        (a full checkpoint resumed under FSDP), the shard `source` is, cut out here (every
        rank holds the whole file: no collective)."""
        if hasattr(saved, "to_local"):
            return local_part(saved)
        spec = getattr(source, "_spec", None)
        if spec is None:
            return saved
        from torch.distributed.tensor import distribute_tensor

        whole = saved.to(local_part(source).device)
        return local_part(distribute_tensor(whole, spec.mesh, spec.placements, src_data_rank=None))


def _averaged(value: Any) -> bool:
    """Whether a state-dict entry is averaged: a dense floating-point or complex tensor
    (not an integer or sparse buffer, nor a module's extra state, which stay the model's)."""
    if not torch.is_tensor(value) or value.layout != torch.strided:
        return False
    return inexact(value)
