"""The callback interface: observe the loop, request actions (stop, save); the loop acts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..loop import Loop


class Callback:
    """Base class; override the hooks you need. `loop.state` holds the counters.

    Hook order: on_train_start, then per epoch on_epoch_start, on_step_end (every optimizer
    update), on_log (every `log_frequency` updates), on_evaluate (after each evaluation),
    on_epoch_end; finally on_train_end.
    """

    def on_train_start(self, loop: Loop) -> None:
        pass

    def on_epoch_start(self, loop: Loop) -> None:
        pass

    def on_step_end(self, loop: Loop) -> None:
        pass

    def on_log(self, loop: Loop, logs: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, loop: Loop, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, loop: Loop, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, loop: Loop, logs: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback` implements `hook` (the loop skips the no-op base hooks per step)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)
