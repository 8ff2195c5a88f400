"""Training modes: each is a `Mode` (its settings, refusals and plan) over a step function.

Every mode runs through the same loop (`traineval.modes.contract` says what a mode owns).
The built-in ones, registered by name:

    Supervised()        "supervised"        (inputs, targets) batches
    Unsupervised()      "unsupervised"      input-only batches, outputs against inputs
    SemiSupervised()    "semi_supervised"   pseudo-labels for the unlabeled samples
    PPO()               "ppo"               proximal policy optimisation on rollouts
    PolicyGradient()    "policy_gradient"   policy gradient on whole episodes
    Reinforcement(...)  "reinforcement"     PPO, or policy gradient when its settings say
    MetaLearning()      "meta_learning"     MAML / FOMAML / Reptile over few-shot tasks
    Federated()         "federated"         FedAvg(M) over simulated clients

`train(mode=...)` takes a `TrainingMode`, a registered name, or a Mode instance (a user's
own Mode trains exactly like a built-in one); `resolve_mode` turns each into an instance
with the config's `mode_settings`.
"""

from __future__ import annotations

from typing import Any

from ..config.training_config import TrainingConfig, TrainingMode
from .base import LossFunction, StepFunction, StepOutput, Updates, move_to_device, split_batch
from .contract import (
    Context,
    Mode,
    ModePlan,
    MonitorChoice,
    mode_class,
    mode_reference,
    register,
    resource,
)
from .federated import Federated, FederatedStep
from .meta_learning import FOMAML, MAML, MetaLearning, MetaLearningStep, Reptile
from .reinforcement import PPO, PolicyGradient, PolicyGradientStep, PPOStep, Reinforcement
from .semi_supervised import SemiSupervised, SemiSupervisedStep
from .supervised import Supervised, SupervisedStep
from .unsupervised import Unsupervised, UnsupervisedStep

__all__ = [
    "FOMAML",
    "MAML",
    "PPO",
    "Context",
    "Federated",
    "FederatedStep",
    "LossFunction",
    "MetaLearning",
    "MetaLearningStep",
    "Mode",
    "ModePlan",
    "MonitorChoice",
    "PPOStep",
    "PolicyGradient",
    "PolicyGradientStep",
    "Reinforcement",
    "Reptile",
    "SemiSupervised",
    "SemiSupervisedStep",
    "StepFunction",
    "StepOutput",
    "Supervised",
    "SupervisedStep",
    "Unsupervised",
    "UnsupervisedStep",
    "Updates",
    "mode_class",
    "mode_reference",
    "move_to_device",
    "register",
    "resolve_mode",
    "resource",
    "split_batch",
]


def resolve_mode(mode: Any, config: TrainingConfig | None = None) -> Mode:
    """The Mode instance `mode` names: an instance as it is, a `TrainingMode` or a registered
    name with the config's `mode_settings` for it.

    Raises:
        ValueError: an unknown name, or settings given both by the instance and the config.
        TypeError: anything else.
    """
    settings = config.mode_settings if config is not None else {}
    if isinstance(mode, Mode):
        given = _given(settings, type(mode))
        if given and any(mode.settings().get(k) != v for k, v in given.items()):
            raise ValueError(
                f"mode={mode!r} and the config's mode_settings[{mode.name!r}]={given!r} "
                "disagree: give the mode's settings in one place"
            )
        return mode
    if isinstance(mode, TrainingMode):
        mode = mode.value
    if isinstance(mode, type) and issubclass(mode, Mode):
        mode = mode.name
    if not isinstance(mode, str):
        raise TypeError(
            "mode must be a TrainingMode, a registered mode name or a Mode instance, got "
            f"{type(mode).__name__}"
        )
    cls = mode_class(mode)
    if cls.name in cls.aliases:  # "reinforcement" itself: its settings choose the algorithm
        return cls.from_settings(settings.get(cls.name, {}))
    return cls.from_settings(_given(settings, cls))


def _given(settings: dict[str, dict[str, Any]], cls: type[Mode]) -> dict[str, Any]:
    """The config's settings for `cls`, under its name or the names it also goes by
    (`Mode.aliases`: PPO's and policy gradient's under "reinforcement")."""
    given: dict[str, Any] = {}
    for name in cls.aliases:  # (the alias's choice of algorithm is made: not a setting)
        given.update({k: v for k, v in settings.get(name, {}).items() if k != "algorithm"})
    given.update(settings.get(cls.name, {}))
    return given
