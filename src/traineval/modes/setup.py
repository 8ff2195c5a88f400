"""What each training mode puts into the loop, and what it refuses before any work.

Supervised, unsupervised and semi-supervised modes train on the user's loader with a step
function. The others run through the same loop with something else in the loader's place:
federated mode iterates rounds (`Updates(1)`: its step trains the clients and the
optimizer is the server's), reinforcement mode iterates policy updates (`Updates(n)`: its
step plays episodes), meta-learning mode iterates batches of tasks with its own validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..batches import ModelLoss
from ..config import TrainingConfig, TrainingMode
from ..distributed import Distributed
from ..envs import make_env
from ..loop import Monitor
from ..precision import Precision
from . import build_step
from .base import Updates
from .federated import FederatedStep, ServerOptimizer, client_loaders
from .reinforcement import PolicyGradientStep

__all__ = ["ModeSetup", "prepare_mode"]

META = TrainingMode.META_LEARNING


@dataclasses.dataclass
class ModeSetup:
    """A mode's part of a run: what the loop iterates and the step it runs on each item.

    `step_fn` is None for federated mode until `optimizer()` builds it (its clients train
    with the run's precision, resolved later).
    """

    mode: TrainingMode
    loader: Any
    step_fn: Any
    uses_own_loader: bool  # False: the user's train loader (to be sharded under torchrun)
    clients: list[Any] = dataclasses.field(default_factory=list)
    # Under torchrun: False where the step cannot run through a DDP wrapper (meta-learning's
    # functional inner loop; federated rounds, whose ranks share the clients and all-reduce
    # the averaged weights); the loop then averages gradients over the ranks itself.
    wraps_model: bool = True
    output_transform: Any = None  # reads the prediction from the model's output
    model_loss: ModelLoss | None = None  # the model computes its own loss from `labels`

    def optimizer(
        self,
        model: nn.Module,
        config: TrainingConfig,
        loss_function: Any,
        precision: Precision,
        default: Callable[[nn.Module], torch.optim.Optimizer],
        job: Distributed | None = None,
    ) -> torch.optim.Optimizer:
        """The loop's optimizer: the server's in federated mode, else `default(model)`."""
        if self.mode is not TrainingMode.FEDERATED:
            return default(model)
        server = ServerOptimizer(
            [p for p in model.parameters() if p.requires_grad],
            config.learning_rate,  # the clients' rate, which the schedule sets per round
            config.federated_server_lr,
            config.federated_server_momentum,
        )
        self.step_fn = FederatedStep(
            loss_function,
            self.clients,
            config,
            precision,
            job,
            output_transform=self.output_transform,
            model_loss=self.model_loss,
        )
        self.step_fn.server = server
        return server

    def max_grad_norm(self, config: TrainingConfig) -> float | None:
        """The loop's clipping; federated clients clip their own gradients, not the server's
        pseudo-gradient."""
        if not config.gradient_clipping or self.mode is TrainingMode.FEDERATED:
            return None
        return config.max_grad_norm

    def evaluate_fn(
        self, val_loader: Any, device: torch.device, precision: Precision, job: Distributed
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """How reinforcement and meta-learning modes validate (greedy episodes; adaptation
        to each task's support set); None where the Evaluator scores `val_loader`."""
        step = self.step_fn
        if self.mode is TrainingMode.REINFORCEMENT:

            def play(model: nn.Module) -> dict[str, float]:
                with precision.autocast():
                    return step.evaluate(model, device)

            return play
        if self.mode is TrainingMode.META_LEARNING and val_loader is not None:

            def adapt(model: nn.Module) -> dict[str, float]:
                with precision.autocast():
                    return step.evaluate(model, val_loader, device, job)

            return adapt
        return None

    def monitor(self, config: TrainingConfig) -> Monitor | None:
        """Reinforcement mode's monitor (val_return unless told otherwise); None elsewhere."""
        if self.mode is not TrainingMode.REINFORCEMENT:
            return None
        name = config.monitor_metric
        allowed = ("val_return", "val_episode_length", "train_loss")
        if name == "val_loss":  # the config's default: this mode has no validation loss
            name = "val_return"
        elif name not in allowed:
            raise ValueError(
                f"monitor_metric={name!r} is invalid in mode='reinforcement': expected one of "
                f"{', '.join(allowed)}"
            )
        minimize = config.minimize_monitor if name == config.monitor_metric else False
        return Monitor(name, minimize=minimize, min_delta=config.early_stopping_min_delta)


def prepare_mode(
    mode: TrainingMode,
    config: TrainingConfig,
    train_loader: Any,
    val_loader: Any,
    loss_function: Any,
    *,
    user_loss: bool,
    job: Distributed,
    output_transform: Any = None,
    model_loss: ModelLoss | None = None,
    label_shift: int = 0,
) -> ModeSetup:
    """Check what `mode` cannot combine with, then build its loader and step function.

    Raises:
        ValueError: a combination the mode does not support, named with the fix.
    """
    c = config
    if mode is TrainingMode.SEMI_SUPERVISED and user_loss:
        raise ValueError(
            "loss_function is not used in mode='semi_supervised': it trains with cross-entropy "
            "on the labeled samples plus the pseudo-label term; leave loss_function None"
        )
    if mode in (TrainingMode.FEDERATED, TrainingMode.REINFORCEMENT, TrainingMode.META_LEARNING):
        _refuse(mode, c, job.enabled)
    if mode is TrainingMode.META_LEARNING:
        allowed = ("val_loss", "val_accuracy", "train_loss")
        if c.monitor_metric not in allowed:
            raise ValueError(
                f"monitor_metric={c.monitor_metric!r} is invalid in mode='meta_learning': "
                f"expected one of {', '.join(allowed)} (query loss and accuracy after adaptation)"
            )
    if mode is TrainingMode.FEDERATED:
        clients = client_loaders(
            train_loader,
            c.federated_clients,
            c.federated_partition,
            c.federated_dirichlet_alpha,
            c.seed,
        )
        # one round per epoch; under torchrun each rank trains a share of the round's clients
        return ModeSetup(
            mode,
            Updates(1),
            None,
            True,
            clients,
            wraps_model=False,
            output_transform=output_transform,
            model_loss=model_loss,
        )
    if mode is TrainingMode.REINFORCEMENT:
        if val_loader is not None:
            raise ValueError(
                "mode='reinforcement' evaluates by playing rl_eval_episodes greedy episodes; "
                "pass no val_loader"
            )
        step = PolicyGradientStep.from_config(_env_factory(train_loader), c, job=job)
        # several forward passes per update: no DDP wrapper, the loop averages the gradients
        return ModeSetup(mode, Updates(c.rl_updates_per_epoch), step, True, wraps_model=False)
    step_fn = build_step(
        mode,
        loss_function,
        c,
        output_transform=output_transform,
        model_loss=model_loss,
        label_shift=label_shift,
    )
    return ModeSetup(mode, train_loader, step_fn, False, wraps_model=mode is not META)


def _refuse(mode: TrainingMode, c: TrainingConfig, distributed: bool) -> None:
    name = mode.value
    if distributed and c.distributed_strategy == "fsdp":
        raise ValueError(
            f"distributed_strategy='fsdp' is not supported in mode='{name}' (it reads and "
            "averages whole weights); use distributed_strategy='ddp'"
        )
    if c.compile:
        why = {
            TrainingMode.META_LEARNING: "MAML differentiates through its inner gradient "
            "steps (double backward), which torch.compile does not support (the first-order "
            "algorithms are not compiled either)",
            TrainingMode.FEDERATED: "each round trains fresh copies of the model on the "
            "clients, and compiling every copy would cost more than it saves",
            TrainingMode.REINFORCEMENT: "an update is one small forward pass per environment "
            "step over a changing number of running episodes: the environments bound it, and "
            "the changing batch would recompile",
        }[mode]
        raise ValueError(f"compile=True is not supported in mode='{name}': {why}; leave it off")
    if mode is not TrainingMode.META_LEARNING and c.gradient_accumulation_steps > 1:
        instead = {
            TrainingMode.FEDERATED: "clients take one optimizer step per batch",
            TrainingMode.REINFORCEMENT: "raise rl_episodes_per_update for larger updates",
        }[mode]
        raise ValueError(
            f"gradient_accumulation_steps={c.gradient_accumulation_steps} is invalid in "
            f"mode='{name}': {instead} (expected 1)"
        )


def _env_factory(source: Any) -> Callable[[], Any]:
    """The environment factory reinforcement mode trains on: a callable, or a name."""
    if isinstance(source, str):
        return make_env(source)
    if callable(source):
        return source
    raise ValueError(
        "mode='reinforcement' takes an environment factory where other modes take the train "
        "loader: a callable returning a gymnasium-style environment (e.g. "
        f"traineval.envs.CartPole), or a name ('CartPole'); got {type(source).__name__}"
    )
