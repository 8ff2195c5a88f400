"""What PPO and policy gradient share: a policy that plays episodes of an environment.

The policy is the model: observations `(N, *obs_shape)` in, action logits `(N, actions)`
out (continuous actions, a bounded 1-d Box of `d` dimensions: `2 d` numbers, the means and
log standard deviations of a Gaussian; see `traineval.modes.actions`), with a state-value
head `(logits, value)` (a tuple, or a mapping with `value`; PPO needs it, policy gradient
can do without). `train()` takes an environment in the train loader's place: a factory
returning a gymnasium-style environment, or a name (gymnasium ids such as "CartPole-v1",
"Acrobot-v1" and "Pendulum-v1", or the built-in "CartPole"), or none when the mode's
`environment` names one. Integer observations are one-hot encoded.

Validation plays `eval_episodes` greedy episodes and reports `return` (mean episode return)
and `episode_length`; each validation plays fresh episodes (seeds drawn from the
checkpointed generator), so the best checkpoint is not the luckiest fit to one fixed set,
and the final test (`score`) plays yet other ones. The training episodes' mean return and
length are logged as `train_episode_return` and `train_episode_length`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import registry
from ..config.checks import Custom, Flag, Int, Number, choice, fail
from ..config.training_config import TaskType, setting
from ..data.splits import DataSplits
from .actions import ActionHead, Gaussian
from .contract import Context, Mode, setting_fields
from .envs import checked, make_env
from .rollouts import episode_seed

MONITORS = ("val_return", "val_episode_length", "train_loss")
ALGORITHMS = ("ppo", "policy_gradient")  # registered names of the two modes over Episodic
LEGACY_NAME = "reinforcement"  # how runs recorded either algorithm before they were two modes


class Discount(Number):
    """A discount factor: a number in [0, 1]."""

    def __init__(self) -> None:
        super().__init__(0, at_most=1)

    def _range(self) -> str:
        return "discount in [0, 1]"


def _environment(field: str, value: Any) -> Any:
    if value is not None and not (isinstance(value, str) and value):
        fail(field, value, "expected a name, e.g. 'CartPole-v1'")
    return value


@dataclasses.dataclass(frozen=True)
class Episodic(Mode):
    """The settings and behaviour PPO and policy gradient share (see the module docstring);
    not a mode of its own."""

    compile_refusal: ClassVar[str | None] = (
        "an update is small forward passes over a few environments' steps: the environments "
        "bound it, and changing batch shapes would recompile"
    )
    shards: ClassVar[bool] = False
    own_metrics: ClassVar[bool] = True
    fold_refusal: ClassVar[str | None] = "its samples are episodes, not rows to fold"
    uses_data: ClassVar[bool] = False
    algorithm: ClassVar[str] = ""  # the algorithm's name (`name`), as runs recorded it
    aliases: ClassVar[tuple[str, ...]] = (LEGACY_NAME,)  # mode_settings, older records

    # the discount of future rewards
    gamma: float = setting(0.99, Discount())
    # the value loss's weight in the loss
    value_coef: float = setting(0.5, Number(0))
    # the entropy bonus's weight (exploration)
    entropy_coef: float = setting(0.01, Number(0))
    # normalise the advantages over each update (PPO: each minibatch)
    normalize_advantages: bool = setting(True, Flag())
    # an episode is cut (truncated, its return bootstrapped) after this many steps
    max_episode_steps: int = setting(1000, Int(1))
    # greedy episodes per validation and per final test
    eval_episodes: int = setting(10, Int(1))
    # the environment of config-file runs: a gymnasium id or "CartPole"
    environment: str | None = setting(
        None, Custom(_environment, "a gymnasium id or 'CartPole', or none")
    )

    @classmethod
    def saved(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """A record written before PPO and policy gradient were two modes (`name:
        reinforcement` with an `algorithm`, and both algorithms' settings) as this
        algorithm's record; see `traineval.modes.reinforcement.chosen`."""
        record = dict(settings)
        if record.get("name") != LEGACY_NAME:
            return record
        algorithm, own = chosen({k: v for k, v in record.items() if k != "name"})
        return {"name": algorithm.name, **own}

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.val_loader is not None:
            raise ValueError(
                f"mode='{self.name}' evaluates by playing eval_episodes greedy episodes; "
                "pass no val_loader"
            )
        name = ctx.config.monitor_metric
        if name != "val_loss" and name not in MONITORS:  # val_loss: the config's default
            raise ValueError(
                f"monitor_metric={name!r} is invalid in mode='{self.name}': expected one of "
                f"{', '.join(MONITORS)}"
            )

    def monitor_of(self, ctx: Context) -> tuple[str, bool]:
        """The monitored metric: the config's, or the validation return (maximised)."""
        c = ctx.config
        name = "val_return" if c.monitor_metric == "val_loss" else c.monitor_metric
        return name, (c.minimize_monitor if name == c.monitor_metric else False)

    def environment_factory(self, source: Any) -> Callable[[], Any]:
        """The environment to train on: `source` (a callable or a name), else `environment`."""
        source = self.environment if source is None else source
        if isinstance(source, str):
            return checked(make_env(source), repr(source))
        if callable(source):
            return checked(source, getattr(source, "__name__", repr(source)))
        raise ValueError(
            f"mode='{self.name}' takes an environment factory where other modes take the "
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
                f"mode: {self.name} needs an environment, e.g. CartPole (or a gymnasium id)",
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
        play = self.greedy(self.environment_factory(data), device)
        try:
            return play(model.to(device), seed + 54321)
        finally:
            close = getattr(play, "close", None)
            if callable(close):
                close()

    def greedy(
        self, factory: Callable[[], Any], device: torch.device
    ) -> Callable[[nn.Module, int], dict[str, float]]:
        """A player of `eval_episodes` greedy episodes: `play(model, seed)`."""
        raise NotImplementedError

    def validation(
        self, play: Callable[[nn.Module, int], dict[str, float]]
    ) -> Callable[[nn.Module], dict[str, float]]:
        """Validation: `play` on fresh episode seeds each time (see `fresh_seed`)."""
        return lambda model: play(model, fresh_seed())


def fresh_seed() -> int:
    """Episode seeds for one validation: fresh each time (the best checkpoint is picked on
    episodes it has not been picked on before), drawn from the global generator, whose state
    checkpoints capture and which the loop puts back after evaluating: a resumed run
    validates on the episodes an uninterrupted one would."""
    return episode_seed()


def chosen(settings: Mapping[str, Any]) -> tuple[type[Episodic], dict[str, Any]]:
    """The algorithm `settings` of mode `reinforcement` ask for, and the settings for it.

    `algorithm` names it; without one, a setting of policy gradient's own chooses policy
    gradient, else PPO. A setting of the other algorithm
    given at other than its default is an error; one at its default (records written
    before the two were separate modes carry both) is dropped. The algorithms are found by
    name in the registry, so this module stays below them.
    """
    settings = dict(settings)
    algorithm = settings.pop("algorithm", None)
    classes = {name: registry.lookup(name) for name in ALGORITHMS}
    shared = {f.name for f in setting_fields(Episodic)}

    def own(name: str) -> dict[str, Any]:
        return {f.name: f.default for f in setting_fields(classes[name]) if f.name not in shared}

    def given(name: str) -> list[str]:
        return [key for key, default in own(name).items() if settings.get(key, default) != default]

    if algorithm is None:  # (a record written before PPO names its settings at any value)
        named = set(own("policy_gradient")) & set(settings)
        algorithm = "policy_gradient" if named else "ppo"
    choice(f"{LEGACY_NAME}.algorithm", algorithm, ALGORITHMS)
    for other in ALGORITHMS:
        if other == algorithm:
            continue
        for key in given(other):
            fail(
                f"{LEGACY_NAME}.{key}",
                settings[key],
                f"a setting of algorithm={other!r}, and this run's is {algorithm!r} (leave "
                f"{key} out, or set algorithm={other!r})",
            )
        for key in own(other):
            settings.pop(key, None)
    return classes[algorithm], settings
