"""The callback interface: observe the loop, request actions (stop, save); the loop acts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ..runs.train_state import TrainState


class Control(Protocol):
    """What a callback's hooks receive (the loop's `LoopControl`): the counters, the model,
    the monitor, read-only views of the optimizer, schedule and scaler, and requests the loop
    carries out at the next step boundary."""

    @property
    def state(self) -> TrainState: ...
    @property
    def model(self) -> nn.Module: ...
    @property
    def monitor(self) -> Any: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def scheduler(self) -> Any: ...
    @property
    def scaler(self) -> Any: ...
    @property
    def num_epochs(self) -> int: ...
    @property
    def updates_per_epoch(self) -> int | None: ...
    @property
    def max_steps(self) -> int | None: ...
    @property
    def rank(self) -> int: ...
    @property
    def is_main(self) -> bool: ...
    @property
    def interrupted(self) -> str | None: ...
    def request_stop(self, reason: str) -> None: ...
    def request_save(self, name: str, *, deferrable: bool = False) -> None: ...
    def request_interrupt(self, reason: str = "SIGTERM") -> None: ...
    def set_learning_rate(self, rate: float) -> None: ...
    def state_to_keep(self, state: dict[str, Any]) -> dict[str, Any]: ...
    def weights_to_keep(self) -> AbstractContextManager[None]: ...


class Callback:
    """Base class; override the hooks you need. Each hook gets the loop's `Control`
    (`loop.state` holds the counters; `loop.request_stop(...)`, `loop.request_save(...)`).

    Hook order: on_train_start; per epoch on_epoch_start, then after each optimizer update
    on_log (every `log_frequency` updates), on_evaluate (every `eval_frequency` updates),
    on_step_end; at the epoch's end on_evaluate (unless that update just evaluated) and
    on_epoch_end; finally on_train_end. When training stops by an exception instead (a
    signal's `TrainingInterrupted`, a failed evaluation, an error in the step), on_exception
    runs before it propagates: release what the callback holds there. Requests
    (`request_save`, `request_stop`) are carried out once the current round of hooks is over.

    A callback with state (`state_dict` / `load_state_dict`) is checkpointed under its
    `state_key` (by default its class name; a second one of the same key gets `#2`), so a
    resumed run finds it whatever the order of the callbacks. The state holds tensors and
    plain values (numbers, strings, lists, tuples, sets, dicts): numpy numbers come back as
    Python numbers and numpy arrays as tensors; anything else is refused before training.
    """

    state_key: str | None = None  # the checkpoint key of its state; None: the class name

    def on_train_start(self, loop: Control) -> None:
        pass

    def on_epoch_start(self, loop: Control) -> None:
        pass

    def on_step_end(self, loop: Control) -> None:
        pass

    def on_log(self, loop: Control, logs: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, loop: Control, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, loop: Control, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, loop: Control, logs: dict[str, Any]) -> None:
        pass

    def on_exception(self, loop: Control, error: BaseException) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_callbacks(callbacks: Any) -> list[Callback]:
    """`callbacks` as a list, refused before any work where they are not `Callback` objects
    (a function, or another library's callback, failed at the first hook with the run
    directory already claimed)."""
    if isinstance(callbacks, (str, bytes, Callback)) or not isinstance(callbacks, Iterable):
        raise TypeError(
            f"callbacks={callbacks!r} is invalid: expected a list of traineval.Callback objects"
        )
    callbacks = list(callbacks)
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            hooks = ", ".join(name for name in vars(Callback) if name.startswith("on_"))
            raise TypeError(
                f"callbacks[{index}] ({type(callback).__name__}) is not a traineval.Callback: "
                f"subclass traineval.Callback and override the hooks you need ({hooks})"
            )
    return callbacks


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback` implements `hook` (the loop skips the no-op base hooks per step)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def state_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Each callback's checkpoint key: its `state_key`, `#n` added to the n-th repeat."""
    seen: Counter[str] = Counter()
    keys = []
    for callback in callbacks:
        key = getattr(callback, "state_key", None) or type(callback).__name__
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def saved_states(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's callback states by key; those of earlier versions were keyed by
    position (`"3:EarlyStopping"`), translated here to the same `Name`, `Name#2` keys."""
    if not all(":" in key and key.partition(":")[0].isdigit() for key in saved):
        return saved
    ordered = sorted(saved, key=lambda key: int(key.partition(":")[0]))
    seen: Counter[str] = Counter()
    out = {}
    for key in ordered:
        name = key.partition(":")[2]
        seen[name] += 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = saved[key]
    return out
