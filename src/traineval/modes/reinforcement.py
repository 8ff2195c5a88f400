"""Reinforcement mode, the specification's `TrainingMode.REINFORCEMENT`: PPO (the default) or
policy gradient, two modes of their own (`traineval.modes.ppo`,
`traineval.modes.policy_gradient`) over the settings they share (`traineval.modes.episodic`).

`mode: reinforcement` in a config file, `train(mode="reinforcement")` and
`Reinforcement(...)` in Python give one of the two: policy gradient when `algorithm:
policy_gradient` is set or one of its own settings (`episodes_per_update`,
`updates_per_epoch`) is given, else PPO. A run records the algorithm's own name (`ppo`,
`policy_gradient`); runs recorded as `reinforcement` with an `algorithm` load and resume as
before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from ..config.checks import OneOf
from ..config.training_config import setting
from .contract import Mode, register
from .episodic import ALGORITHMS, LEGACY_NAME, Episodic, chosen
from .policy_gradient import PolicyGradient, PolicyGradientStep
from .ppo import PPO, PPOStep

__all__ = ["PPO", "PPOStep", "PolicyGradient", "PolicyGradientStep", "Reinforcement"]


@register
@dataclasses.dataclass(frozen=True)
class Reinforcement(Episodic):
    """PPO or policy gradient (`traineval.modes.reinforcement`): `algorithm` names one;
    without it a policy-gradient setting chooses policy gradient, else PPO. Takes the
    settings below and the chosen algorithm's own (see `ppo` and `policy_gradient`).
    `Reinforcement(...)` returns a `PPO` or a `PolicyGradient`."""

    name: ClassVar[str] = LEGACY_NAME

    # ppo or policy_gradient; none: policy_gradient when one of its settings is given
    algorithm: str | None = setting(None, OneOf(ALGORITHMS))  # type: ignore[assignment,misc]

    def __new__(cls, *args: Any, **settings: Any) -> Any:
        if args:
            raise TypeError("Reinforcement takes its settings by name")
        algorithm, own = chosen(settings)
        return algorithm.from_settings(own)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Mode:
        """The chosen algorithm's mode with its settings (see `episodic.chosen`)."""
        algorithm, own = chosen(settings)
        return algorithm.from_settings(own)


assert (PPO.name, PolicyGradient.name) == ALGORITHMS
