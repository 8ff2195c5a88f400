"""Checkpoint requests: best (on the monitored metric), last, and every N epochs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..system.distributed import (
    as_sharded,
    empty_places,
    is_sharded,
    load_local_model_state,
    load_model_state,
    local_model_state,
    local_part,
    model_state,
)
from .base import Callback, Control


class ModelCheckpoint(Callback):
    """Request `best` when the monitored metric improves, `last` and `epoch-NNNN` per epoch,
    and `last` every `every_n_steps` optimizer updates (so a long epoch can be resumed inside).

    `best` and the epoch-end `last` are deferrable: with many tiny epochs the loop writes them
    only while checkpoints take at most a small share of the run's time, and at least every
    2 minutes (`checkpoint_writer.WriteBudget`; a `best` put off is copied to host memory and
    written later; `last` holds the state at the run's end); a run killed in between
    resumes, exactly, from the latest checkpoint written.
    """

    def __init__(
        self,
        save_best: bool = True,
        save_last: bool = True,
        every_n_epochs: int = 0,
        every_n_steps: int = 0,
    ) -> None:
        self.save_best = save_best
        self.save_last = save_last
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps

    def on_step_end(self, loop: Control) -> None:
        if self.every_n_steps and loop.state.global_step % self.every_n_steps == 0:
            loop.request_save("last")

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.save_best and logs.get("improved"):
            loop.request_save("best", deferrable=True)

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.save_best and logs.get("improved"):
            loop.request_save("best", deferrable=True)
        epoch = loop.state.epoch
        complete = logs.get("epoch_complete", True)  # else a run ending inside the epoch
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and complete:
            loop.request_save(f"epoch-{epoch:04d}")
        if self.save_last:  # within the loop's write budget; the final state always
            loop.request_save("last", deferrable=True)


class BestWeights(Callback):
    """Keep a host copy of the weights at the best evaluation; load them when training ends.

    With a moving average of the weights (`ema_decay`) those are the averaged weights, the
    ones that were evaluated.

    Under FSDP each rank keeps its own shards (`keep_shards`, unless checkpoints are
    written full): no rank gathers the model, and a sharded checkpoint holds each rank's
    part in its folder (`shard_state`, `shard_template`, `load_shard_state`) rather than in
    the checkpoint file. With full checkpoints (`checkpoint_sharding: full`) taking the copy
    gathers the full weights on rank 0, to travel in the file, and loading them sends them
    back out.
    """

    def __init__(self, keep_shards: bool = True) -> None:
        self.keep_shards = keep_shards
        self.best_state: dict[str, torch.Tensor] | None = None  # whole (rank 0's under FSDP)
        self.best_shards: dict[str, Any] | None = None  # this rank's part of an FSDP model

    def state_dict(self) -> dict[str, Any]:
        return {"best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_state = state["best_state"]

    def shard_state(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """This rank's best shards, sharded like the model, for a sharded checkpoint's folder."""
        return None if self.best_shards is None else as_sharded(model, self.best_shards)

    def shard_template(self, model: torch.nn.Module) -> dict[str, Any]:
        """Places, sharded like the model, for `load_shard_state` to read into."""
        return empty_places(model)

    def load_shard_state(self, state: dict[str, Any]) -> None:
        """The best weights as a sharded checkpoint's folder held them: this rank's shards
        (on the host), or, where checkpoints are now written full, the whole weights (a
        collective: every rank resumes), to travel in the next checkpoint file."""
        if self.keep_shards:
            self.best_shards, self.best_state = (
                {k: _on_host(local_part(v)) for k, v in state.items()},
                None,
            )
            return
        whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        self.best_state, self.best_shards = {k: _on_host(v) for k, v in whole.items()}, None

    def _snapshot(self, loop: Control, logs: dict[str, Any]) -> None:
        if not logs.get("improved"):  # the same on every rank: metrics are merged over ranks
            return
        if is_sharded(loop.model) and self.keep_shards:
            with loop.weights_to_keep():  # the average's shards, with ema_decay
                self.best_shards, self.best_state = local_model_state(loop.model), None
            return
        self.best_shards = None  # (one a resume read from a sharded checkpoint)
        if is_sharded(loop.model):  # full weights, already copied to the host, on rank 0
            with loop.weights_to_keep():
                self.best_state = model_state(loop.model)
        else:
            kept = loop.state_to_keep(loop.model.state_dict())  # the average, with ema_decay
            self.best_state = {key: _on_host(value) for key, value in kept.items()}

    on_evaluate = _snapshot
    on_epoch_end = _snapshot

    def on_train_end(self, loop: Control, logs: dict[str, Any]) -> None:
        if self.best_shards is not None:
            load_local_model_state(loop.model, self.best_shards)
            logs["restored_best_weights"] = True
        elif self.best_state is not None:
            load_model_state(loop.model, self.best_state)
            logs["restored_best_weights"] = True


def _on_host(value: Any) -> Any:
    """A tensor as a host copy; another entry (a module's extra state) as a copy of it."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)
