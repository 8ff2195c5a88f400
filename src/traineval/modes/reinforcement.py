"""Reinforcement mode: PPO (the default) or policy gradient, on episodes the policy plays.

The policy is the model: observations `(N, *obs_shape)` in, action logits `(N, actions)`
out (continuous actions, a bounded 1-d Box of `d` dimensions: `2 d` numbers, the means and
log standard deviations of a Gaussian; see `traineval.modes.actions`), with a state-value
head `(logits, value)` (a tuple, or a mapping with `value`; PPO needs it, policy gradient
can do without). `train()` takes an environment in the train loader's place: a factory
returning a gymnasium-style environment, or a name (gymnasium ids such as "CartPole-v1",
"Acrobot-v1" and "Pendulum-v1", or the built-in "CartPole"), or none when the mode's
`environment` names one. Integer observations are one-hot encoded.

- `algorithm="ppo"` (`traineval.modes.ppo`): each loop update is one minibatch of a
  rollout of `envs` x `rollout_steps` steps; `ppo_epochs` shuffled passes over it; an
  epoch is `rollouts_per_epoch` rollouts. Clipped objective, GAE (`gae_lambda`), optional
  value clipping, advantage normalisation, entropy bonus; exact resume mid-rollout. The
  environments step in this process (`vectorization="sync"`) or each in a worker process
  through gymnasium's AsyncVectorEnv (`"async"`, `traineval.modes.env_workers`), with the
  same episodes either way. A policy that explores by gSDE (`ActorCritic(sde=True)`) draws
  new noise matrices every `sde_sample_freq` steps (-1: once per rollout).
- `algorithm="policy_gradient"` (`traineval.modes.policy_gradient`): each loop update
  collects `episodes_per_update` whole episodes; an epoch is `updates_per_epoch` updates.

The loop's optimizer, schedule, clipping, checkpoints and loggers work on these updates as
on any other. The training episodes' mean return and length are logged as
`train_episode_return` and `train_episode_length`. Validation plays `eval_episodes` greedy
episodes and reports `return` (mean episode return) and `episode_length`; each validation
plays fresh episodes (seeds drawn from the checkpointed generator), so the best checkpoint
is not the luckiest fit to one fixed set, and the final test (`Reinforcement.score`) plays
yet other ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config.checks import boolean, choice, fail, integer, number
from ..config.training_config import TaskType
from ..data.splits import DataSplits
from ..system.distributed import Distributed
from .actions import ActionHead, Gaussian
from .base import Updates
from .contract import Context, Mode, ModePlan, MonitorChoice, register
from .envs import checked, make_env
from .policy_gradient import PolicyGradientStep
from .ppo import PPOStep
from .rollouts import episode_seed

__all__ = ["PolicyGradientStep", "Reinforcement"]

MONITORS = ("val_return", "val_episode_length", "train_loss")
ALGORITHMS = ("ppo", "policy_gradient")
VECTORIZATIONS = ("sync", "async")
OWN_SETTINGS = {
    "ppo": (
        "envs",
        "rollout_steps",
        "minibatch_size",
        "ppo_epochs",
        "clip_range",
        "clip_decay",
        "value_clip",
        "gae_lambda",
        "rollouts_per_epoch",
        "normalize_rewards",
        "vectorization",
        "sde_sample_freq",
    ),
    "policy_gradient": ("episodes_per_update", "updates_per_epoch"),
}


@register
@dataclasses.dataclass(frozen=True)
class Reinforcement(Mode):
    """PPO or policy gradient on episodes the policy plays (`traineval.modes.reinforcement`).

    `algorithm` None picks "policy_gradient" when one of its own settings
    (`episodes_per_update`, `updates_per_epoch`) is given, else "ppo". The PPO settings
    (`envs` ... `rollouts_per_epoch`) apply to PPO only, the policy-gradient ones to
    policy gradient only; giving one to the other algorithm is an error. Validation plays
    `eval_episodes` greedy episodes.
    """

    name: ClassVar[str] = "reinforcement"
    compile_refusal: ClassVar[str | None] = (
        "an update is small forward passes over a few environments' steps: the environments "
        "bound it, and changing batch shapes would recompile"
    )
    accumulation_refusal: ClassVar[str | None] = (
        "raise minibatch_size (PPO) or episodes_per_update (policy gradient) for larger updates"
    )
    shards: ClassVar[bool] = False
    own_metrics: ClassVar[bool] = True
    fold_refusal: ClassVar[str | None] = "its samples are episodes, not rows to fold"
    uses_data: ClassVar[bool] = False
    resume_fixed: ClassVar[tuple[str, ...]] = (
        "algorithm",
        "envs",
        "rollout_steps",
        "minibatch_size",
        "ppo_epochs",
        "normalize_rewards",
    )
    algorithm: str | None = None
    envs: int = 8
    rollout_steps: int = 128
    minibatch_size: int = 256
    ppo_epochs: int = 10
    clip_range: float = 0.2
    clip_decay: bool = False
    value_clip: float | None = None
    gae_lambda: float = 0.95
    rollouts_per_epoch: int = 10
    episodes_per_update: int = 8
    updates_per_epoch: int = 10
    gamma: float = 0.99
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    normalize_advantages: bool = True
    max_episode_steps: int = 1000
    eval_episodes: int = 10
    environment: str | None = None
    normalize_rewards: bool = False
    vectorization: str = "sync"
    sde_sample_freq: int = -1

    def __post_init__(self) -> None:
        self._resolve_algorithm()
        for name in (
            "episodes_per_update",
            "updates_per_epoch",
            "max_episode_steps",
            "envs",
            "rollout_steps",
            "minibatch_size",
            "ppo_epochs",
            "rollouts_per_epoch",
            "eval_episodes",
        ):
            integer(self.key(name), getattr(self, name), minimum=1)
        for name, what in (("gamma", "a discount"), ("gae_lambda", "a number")):
            number(self.key(name), getattr(self, name), minimum=0)
            if getattr(self, name) > 1:
                fail(self.key(name), getattr(self, name), f"expected {what} in [0, 1]")
        number(self.key("value_coef"), self.value_coef, minimum=0)
        number(self.key("entropy_coef"), self.entropy_coef, minimum=0)
        number(self.key("clip_range"), self.clip_range, minimum=0, strict=True)
        if self.value_clip is not None:
            number(self.key("value_clip"), self.value_clip, minimum=0, strict=True)
        boolean(self.key("normalize_advantages"), self.normalize_advantages)
        boolean(self.key("clip_decay"), self.clip_decay)
        boolean(self.key("normalize_rewards"), self.normalize_rewards)
        choice(self.key("vectorization"), self.vectorization, VECTORIZATIONS)
        integer(self.key("sde_sample_freq"), self.sde_sample_freq, minimum=-1)
        if self.sde_sample_freq == 0:
            fail(
                self.key("sde_sample_freq"),
                0,
                "expected -1 (new gSDE noise once per rollout) or a number of steps >= 1",
            )
        if self.environment is not None and not (
            isinstance(self.environment, str) and self.environment
        ):
            fail(self.key("environment"), self.environment, "expected a name, e.g. 'CartPole-v1'")

    def _resolve_algorithm(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}

        def given(name: str) -> bool:
            return bool(getattr(self, name) != defaults[name])

        algorithm = self.algorithm
        if algorithm is None:
            own = any(given(name) for name in OWN_SETTINGS["policy_gradient"])
            algorithm = "policy_gradient" if own else "ppo"
            object.__setattr__(self, "algorithm", algorithm)
        choice(self.key("algorithm"), algorithm, ALGORITHMS)
        for other, names in OWN_SETTINGS.items():
            for name in names:
                if other != algorithm and given(name):
                    fail(
                        self.key(name),
                        getattr(self, name),
                        f"a setting of algorithm={other!r}, and this run's is {algorithm!r} "
                        f"(leave {name} out, or set algorithm={other!r})",
                    )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Mode:
        """As `Mode.from_settings`; a record without `algorithm` that names a
        policy-gradient setting (config files and checkpoints written before PPO) is
        policy gradient."""
        return super().from_settings(cls.saved(settings))

    @classmethod
    def saved(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        if "algorithm" in settings or not set(OWN_SETTINGS["policy_gradient"]) & set(settings):
            return dict(settings)
        return {"algorithm": "policy_gradient", **settings}

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.val_loader is not None:
            raise ValueError(
                "mode='reinforcement' evaluates by playing eval_episodes greedy episodes; "
                "pass no val_loader"
            )
        name = ctx.config.monitor_metric
        if name != "val_loss" and name not in MONITORS:  # val_loss: the config's default
            raise ValueError(
                f"monitor_metric={name!r} is invalid in mode='reinforcement': expected one of "
                f"{', '.join(MONITORS)}"
            )

    def step(
        self,
        env_factory: Callable[[], Any],
        *,
        episodes: int | None = None,
        job: Distributed | None = None,
    ) -> PolicyGradientStep:
        """The policy-gradient step these settings describe (`episodes` overrides the
        episodes per update, e.g. 1 where the step only evaluates)."""
        return PolicyGradientStep(
            env_factory,
            episodes=self.episodes_per_update if episodes is None else episodes,
            gamma=self.gamma,
            value_coef=self.value_coef,
            entropy_coef=self.entropy_coef,
            normalize_advantages=self.normalize_advantages,
            max_episode_steps=self.max_episode_steps,
            eval_episodes=self.eval_episodes,
            job=job,
        )

    def ppo_step(
        self,
        env_factory: Callable[[], Any],
        *,
        total_rollouts: int | None = None,
        job: Distributed | None = None,
    ) -> PPOStep:
        """The PPO step these settings describe."""
        return PPOStep(
            env_factory,
            envs=self.envs,
            rollout_steps=self.rollout_steps,
            minibatch_size=self.minibatch_size,
            epochs=self.ppo_epochs,
            clip_range=self.clip_range,
            clip_decay=self.clip_decay,
            value_clip=self.value_clip,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            value_coef=self.value_coef,
            entropy_coef=self.entropy_coef,
            normalize_advantages=self.normalize_advantages,
            normalize_rewards=self.normalize_rewards,
            max_episode_steps=self.max_episode_steps,
            total_rollouts=total_rollouts,
            job=job,
            vectorization=self.vectorization,
            sde_sample_freq=self.sde_sample_freq,
        )

    def environment_factory(self, source: Any) -> Callable[[], Any]:
        """The environment to train on: `source` (a callable or a name), else `environment`."""
        source = self.environment if source is None else source
        if isinstance(source, str):
            return checked(make_env(source), repr(source))
        if callable(source):
            return checked(source, getattr(source, "__name__", repr(source)))
        raise ValueError(
            "mode='reinforcement' takes an environment factory where other modes take the "
            "train loader: a callable returning a gymnasium-style environment (e.g. "
            "traineval.modes.envs.CartPole), or a name ('CartPole-v1'); got "
            f"{type(source).__name__}"
        )

    # -- a config-file run: the environment is the data ------------------------------------

    def check_config_run(self) -> None:
        if not self.environment:
            fail(
                "mode.environment",
                self.environment,
                "mode: reinforcement needs an environment, e.g. CartPole (or a gymnasium id)",
            )

    def prepare(self, splits: Any, data: Any) -> DataSplits:
        """Train on the environment and test on fresh greedy episodes of it (no validation
        split: validation plays episodes too); the model's input is an observation, its
        output the action head's (discrete: n logits; continuous: 2 d, means and log stds)."""
        factory = self.environment_factory(None)
        probe = factory()
        observation, _ = probe.reset(seed=0)
        head = ActionHead.of(probe)
        close = getattr(probe, "close", None)
        if callable(close):
            close()
        return DataSplits(
            train=factory,
            val=None,
            test=factory,
            input_shape=tuple(np.shape(observation)),
            num_outputs=head.outputs,
            task_type=TaskType.REGRESSION,  # not read: the mode scores its model itself
            notes={"gaussian": isinstance(head, Gaussian)},
        )

    def task_of(self, splits: DataSplits) -> TaskType | None:
        return None

    def model_options(
        self, model: str, options: dict[str, Any], splits: DataSplits
    ) -> dict[str, Any]:
        """An actor-critic for continuous actions has a Gaussian head."""
        if model == "actor_critic" and splits.notes.get("gaussian"):
            options.setdefault("gaussian", True)
        return options

    def score(
        self, model: nn.Module, data: Any, device: torch.device, *, seed: int = 0
    ) -> dict[str, float]:
        """The greedy policy on `eval_episodes` fresh episodes of `data` (an environment
        factory or name; None: `environment`), seeded apart from validation's."""
        factory = self.environment_factory(data)
        if self.vectorization == "async":  # the episodes in worker processes
            ppo = self.ppo_step(factory)
            try:
                return ppo.evaluate(model.to(device), device, seed + 54321, self.eval_episodes)
            finally:
                ppo.close()
        step = self.step(factory, episodes=1)
        return step.evaluate(model.to(device), device, seed=seed + 54321)

    def plan(self, ctx: Context) -> ModePlan:
        factory = self.environment_factory(ctx.train_data)
        step: PolicyGradientStep | PPOStep
        if self.algorithm == "ppo":
            step = self.ppo_step(factory, job=ctx.job)
            step.total_rollouts = self._rollouts(ctx, step.updates_per_rollout)
            updates = self.rollouts_per_epoch * step.updates_per_rollout
        else:
            step = self.step(factory, job=ctx.job)
            updates = self.updates_per_epoch
        c = ctx.config
        name = "val_return" if c.monitor_metric == "val_loss" else c.monitor_metric
        minimize = c.minimize_monitor if name == c.monitor_metric else False
        device = ctx.device
        # several forward passes per update: no DDP wrapper, the loop averages the gradients;
        # the ranks share one stream (each update's base seed, which their episodes derive from)
        return ModePlan(
            step,
            loader=Updates(updates),
            wraps_model=False,
            evaluate=self._validation(step, factory, device),
            monitor=MonitorChoice(name, minimize),
            shared_seed=True,
        )

    def _validation(
        self, step: PolicyGradientStep | PPOStep, factory: Callable[[], Any], device: torch.device
    ) -> Callable[[nn.Module], dict[str, float]]:
        """Validation: `eval_episodes` fresh greedy episodes, in the PPO step's worker
        processes with vectorization='async', else in this process."""
        if isinstance(step, PPOStep) and self.vectorization == "async":
            return lambda model: step.evaluate(model, device, _fresh_seed(), self.eval_episodes)
        evaluator = self.step(factory, episodes=1)
        return lambda model: evaluator.evaluate(model, device, seed=_fresh_seed())

    def _rollouts(self, ctx: Context, updates_per_rollout: int) -> int:
        """How many rollouts the run collects (the clipping range decays over them)."""
        c = ctx.config
        total = c.num_epochs * self.rollouts_per_epoch
        if c.max_steps is not None:
            total = min(total, math.ceil(c.max_steps / updates_per_rollout))
        return total


def _fresh_seed() -> int:
    """Episode seeds for one validation: fresh each time (the best checkpoint is picked on
    episodes it has not been picked on before), drawn from the global generator, whose state
    checkpoints capture and which the loop puts back after evaluating: a resumed run
    validates on the episodes an uninterrupted one would."""
    return episode_seed()
