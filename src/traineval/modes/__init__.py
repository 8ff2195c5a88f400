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
from .resolve import resolve_mode
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
