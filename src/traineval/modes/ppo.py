"""Proximal policy optimisation (Schulman et al., 2017): rollouts as the loop's data.

Each loop update is one minibatch of the current rollout. When the rollout is used up
(`epochs` passes over it in shuffled minibatches) the step collects the next one: `T`
lockstep steps of `N` environments (`rollouts.EnvBatch`) with the current policy, in eval
mode and without gradients; a time-limit cut bootstraps the reward with `gamma * V(last
observation)`; advantages and value targets by GAE (`rollouts.gae`). The loss of a minibatch
is

    -mean(min(r * A, clip(r, 1 - eps, 1 + eps) * A))     r = pi(a|s) / pi_old(a|s)
    + value_coef * mean((V(s) - R)^2)                     V clipped around V_old if asked
    - entropy_coef * mean(entropy(pi(.|s)))

with the advantages A normalised over the minibatch when `normalize_advantages`; the
clipping range `eps` decays linearly to 0 over the run when `clip_decay`. The loop's
optimizer, schedule, gradient clipping (`max_grad_norm`), checkpoints and loggers do the
rest, as for any mode.

State and exact resume: the rollout (observations, actions, old log-probabilities and
values, advantages, returns), the minibatch order, the position in it and the environments
(`EnvBatch.state_dict`: seeds and actions, replayed on restore) are the step's
`state_dict()`, which checkpoints carry; every random draw (episode seeds, sampled actions,
minibatch order) comes from the global torch generator, which they capture too. A run
interrupted anywhere resumes to the weights an uninterrupted run reaches.

Observation normalisation: `traineval.models.RunningNorm` layers in the policy are updated
from the observations the policy plays on (as Stable-Baselines3's VecNormalize does), are
saved with the model and normalise at evaluation alike; the rollout's old log-probabilities
and values are then recomputed with the statistics the update starts from.

Reward normalisation (`normalize_rewards=True`, as Stable-Baselines3's
`VecNormalize(norm_reward=True)`): each reward is divided by the running standard deviation
of the discounted return and clipped to +-10 before GAE; the statistics and each
environment's running return are part of the step's state (exact resume).

Under torchrun each rank plays its own environments (seeds and actions from a generator
derived from the shared stream and the rank) and trains on its own minibatches; the loop
averages the ranks' gradients (as CleanRL's multi-GPU PPO), and the normalisation statistics
are merged over the ranks, so every rank holds the same policy.

The mode (`PPO`, registered as "ppo"; `mode: reinforcement` is PPO unless it names policy
gradient): each loop update is one minibatch of a rollout of `envs` x `rollout_steps`
steps; `ppo_epochs` shuffled passes over it; an epoch is `rollouts_per_epoch` rollouts. The
environments step in this process (`vectorization="sync"`) or each in a worker process
through gymnasium's AsyncVectorEnv (`"async"`, `traineval.modes.env_workers`), with the
same episodes either way. A policy that explores by gSDE (`ActorCritic(sde=True)`) draws
new noise matrices every `sde_sample_freq` steps (-1: once per rollout). Its other settings
are those both algorithms share (`traineval.modes.episodic`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config.checks import Custom, Flag, Int, Number, OneOf, fail
from ..config.training_config import setting
from ..models.policies import RunningNorm
from ..system.distributed import Distributed
from ..training.batches import in_eval_mode
from .actions import ActionHead
from .base import StepOutput, Updates
from .contract import Context, ModePlan, MonitorChoice, register
from .episodic import Episodic
from .policy_gradient import PolicyGradient
from .rollouts import EnvBatch, episode_seed, gae, greedy_episodes, read_policy

__all__ = ["PPO", "PPOStep", "policy_outputs"]

logger = logging.getLogger(__name__)

VECTORIZATIONS = ("sync", "async")


def _sde_sample_freq(field: str, value: Any) -> Any:
    Int(-1)(field, value)
    if value == 0:
        fail(field, 0, "expected -1 (new gSDE noise once per rollout) or a number of steps >= 1")
    return value


@register
@dataclasses.dataclass(frozen=True)
class PPO(Episodic):
    """Proximal policy optimisation on rollouts the policy plays (`traineval.modes.ppo`);
    `mode: reinforcement` is this mode unless it names policy gradient."""

    name: ClassVar[str] = "ppo"
    algorithm: ClassVar[str] = "ppo"
    accumulation_refusal: ClassVar[str | None] = "raise minibatch_size for larger updates"
    resume_fixed: ClassVar[tuple[str, ...]] = (
        "envs",
        "rollout_steps",
        "minibatch_size",
        "ppo_epochs",
        "normalize_rewards",
    )

    # environments stepped in lockstep
    envs: int = setting(8, Int(1))
    # steps of each environment per rollout
    rollout_steps: int = setting(128, Int(1))
    # samples per update (at most envs x rollout_steps)
    minibatch_size: int = setting(256, Int(1))
    # shuffled passes over each rollout
    ppo_epochs: int = setting(10, Int(1))
    # the clipped objective's range around the old policy
    clip_range: float = setting(0.2, Number(0, strict=True))
    # decay clip_range linearly to 0 over the run
    clip_decay: bool = setting(False, Flag())
    # clip the value around the rollout's (none: no value clipping)
    value_clip: float | None = setting(None, Number(0, strict=True, optional=True))
    # GAE's lambda
    gae_lambda: float = setting(0.95, Number(0, at_most=1))
    # rollouts per epoch
    rollouts_per_epoch: int = setting(10, Int(1))
    # divide rewards by the running std of the discounted return (clipped to +-10)
    normalize_rewards: bool = setting(False, Flag())
    # environments in this process ("sync") or each in a worker process ("async")
    vectorization: str = setting("sync", OneOf(VECTORIZATIONS))
    # gSDE: new exploration noise every that many steps (-1: once per rollout)
    sde_sample_freq: int = setting(-1, Custom(_sde_sample_freq, "-1 or an integer >= 1"))

    def step(
        self,
        env_factory: Callable[[], Any],
        *,
        total_rollouts: int | None = None,
        job: Distributed | None = None,
    ) -> PPOStep:
        """The PPO step these settings describe."""
        return PPOStep(env_factory, self, total_rollouts=total_rollouts, job=job)

    def greedy(
        self, factory: Callable[[], Any], device: torch.device
    ) -> Callable[[nn.Module, int], dict[str, float]]:
        """Greedy episodes in worker processes with vectorization='async' (a step of its
        own, closed with the player), else in this process as policy gradient plays them."""
        if self.vectorization == "async":
            return _AsyncPlayer(self.step(factory), device, self.eval_episodes)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(Episodic)}
        return PolicyGradient(**shared).greedy(factory, device)

    def plan(self, ctx: Context) -> ModePlan:
        factory = self.environment_factory(ctx.train_data)
        step = self.step(factory, job=ctx.job)
        step.total_rollouts = self._rollouts(ctx, step.updates_per_rollout)
        name, minimize = self.monitor_of(ctx)
        play: Callable[[nn.Module, int], dict[str, float]]
        if self.vectorization == "async":  # validation in the training step's workers
            play = _AsyncPlayer(step, ctx.device, self.eval_episodes, owned=False)
        else:
            play = self.greedy(factory, ctx.device)
        # several forward passes per update: no DDP wrapper, the loop averages the gradients;
        # the ranks share one stream (each update's base seed, which their episodes derive from)
        return ModePlan(
            step,
            loader=Updates(self.rollouts_per_epoch * step.updates_per_rollout),
            wraps_model=False,
            evaluate=self.validation(play),
            monitor=MonitorChoice(name, minimize),
            shared_seed=True,
        )

    def _rollouts(self, ctx: Context, updates_per_rollout: int) -> int:
        """How many rollouts the run collects (the clipping range decays over them)."""
        c = ctx.config
        total = c.num_epochs * self.rollouts_per_epoch
        if c.max_steps is not None:
            total = min(total, math.ceil(c.max_steps / updates_per_rollout))
        return total


class _AsyncPlayer:
    """Greedy episodes in a PPO step's worker processes: `player(model, seed)`; `close()`
    ends the workers of a step it owns."""

    def __init__(
        self, step: PPOStep, device: torch.device, episodes: int, *, owned: bool = True
    ) -> None:
        self.step, self.device, self.episodes, self.owned = step, device, episodes, owned

    def __call__(self, model: nn.Module, seed: int) -> dict[str, float]:
        return self.step.evaluate(model, self.device, seed, self.episodes)

    def close(self) -> None:
        if self.owned:
            self.step.close()


ROLLOUT_KEYS = ("observations", "actions", "log_probs", "values", "advantages", "returns")


def explorer(model: nn.Module) -> Any:
    """The module that draws a gSDE policy's noise matrices (`exploration_weights(n,
    generator)`, e.g. `ActorCritic(sde=True)`); a clear error where there is none."""
    for module in model.modules():
        if callable(getattr(module, "exploration_weights", None)):
            return module
    raise ValueError(
        "the policy returns sde_features (gSDE exploration) but none of its modules has "
        "exploration_weights(n, generator) to draw the noise matrices"
    )


def normalizers(model: nn.Module) -> list[Any]:
    """The policy's observation normalisers: modules with `update_statistics(obs, job)`
    (`traineval.models.RunningNorm`)."""
    return [m for m in model.modules() if callable(getattr(m, "update_statistics", None))]


def policy_outputs(model: nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and values `(N,)` of a policy with a value head; a clear error without one."""
    return with_value(read_policy(model(obs)))


def with_value(read: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, value = read
    if value is None:
        raise ValueError(
            "algorithm='ppo' needs a value head: a model returning (logits, value) or a "
            "mapping with 'value' (e.g. the built-in actor_critic); use "
            "algorithm='policy_gradient' for a policy without one"
        )
    return logits, value


class RewardScale:
    """Rewards divided by the running standard deviation of the discounted return, clipped
    to +-`clip` (Stable-Baselines3's `VecNormalize(norm_reward=True)`): each environment
    keeps its return `R = gamma R + r` (zero again when its episode ends), whose mean and
    variance a `RunningNorm` tracks (merged over the ranks under torchrun)."""

    def __init__(self, envs: int, gamma: float, job: Distributed, clip: float = 10.0) -> None:
        self.gamma, self.job, self.clip = gamma, job, clip
        self.returns = np.zeros(envs, dtype=np.float64)
        self.statistics = RunningNorm(1)

    def __call__(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.statistics.update_statistics(torch.as_tensor(self.returns)[:, None], self.job)
        scale = float(torch.sqrt(self.statistics.var[0] + 1e-8))
        scaled = np.clip(rewards / scale, -self.clip, self.clip)
        self.returns[ended] = 0.0
        return scaled

    def state_dict(self) -> dict[str, Any]:
        return {"returns": torch.as_tensor(self.returns), **self.statistics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns = state["returns"].numpy().astype(np.float64)
        self.statistics.load_state_dict({k: state[k] for k in ("mean", "var", "count")})


def env_batch(
    vectorization: str,
    factory: Callable[[], Any],
    envs: int,
    max_episode_steps: int,
    like: EnvBatch | None = None,
) -> EnvBatch:
    """The rollout's environments: in this process ("sync"), or each in a worker process
    through gymnasium's AsyncVectorEnv ("async", `traineval.modes.env_workers`, with the
    spaces of `like`, a batch of the same environments, where given)."""
    if vectorization == "sync":
        return EnvBatch(factory, envs, max_episode_steps)
    try:
        from .env_workers import AsyncEnvBatch
    except ImportError as error:
        raise ImportError(
            "mode.vectorization='async' steps the environments through gymnasium.vector: "
            "pip install gymnasium"
        ) from error
    spaces = like.spaces if isinstance(like, AsyncEnvBatch) else None
    return AsyncEnvBatch(factory, envs, max_episode_steps, spaces)


class PPOStep:
    """One PPO minibatch update per call; see the module docstring."""

    def __init__(
        self,
        env_factory: Callable[[], Any],
        settings: PPO,
        *,
        total_rollouts: int | None = None,
        job: Distributed | None = None,
    ) -> None:
        """The numbers of the rollouts, the loss and the environments are `settings`';
        `total_rollouts` is the run's (the clipping range decays over them)."""
        s = settings
        self.batch = env_batch(s.vectorization, env_factory, s.envs, s.max_episode_steps)
        self.env_factory, self.vectorization = env_factory, s.vectorization
        self.sde_sample_freq = s.sde_sample_freq  # gSDE: new noise every that many steps
        self._weights: torch.Tensor | None = None  # gSDE's noise matrices, one per env
        self._evaluation: EnvBatch | None = None  # greedy episodes, made at the first
        self.head = ActionHead.of(self.batch.spaces)  # categorical, or Gaussian for a Box
        self.rollout_steps = s.rollout_steps
        self.size = s.envs * s.rollout_steps
        self.minibatch_size = min(s.minibatch_size, self.size)
        default = type(s).__dataclass_fields__["minibatch_size"].default
        if s.minibatch_size > self.size and s.minibatch_size != default:
            logger.warning(
                "ppo minibatch_size=%d is more than a rollout holds (envs %d x rollout_steps "
                "%d = %d samples): each update takes the whole rollout",
                s.minibatch_size,
                s.envs,
                s.rollout_steps,
                self.size,
            )
        self.minibatches = math.ceil(self.size / self.minibatch_size)
        self.epochs = s.ppo_epochs
        self.clip_range, self.clip_decay, self.value_clip = s.clip_range, s.clip_decay, s.value_clip
        self.gamma, self.gae_lambda = s.gamma, s.gae_lambda
        self.value_coef, self.entropy_coef = s.value_coef, s.entropy_coef
        self.normalize_advantages = s.normalize_advantages
        self.total_rollouts = total_rollouts
        self.job = job or Distributed()
        self.reward_scale = RewardScale(s.envs, s.gamma, self.job) if s.normalize_rewards else None
        self.rollout: dict[str, torch.Tensor] | None = None
        self.order: torch.Tensor | None = None  # (epochs, size): each pass's shuffle
        self.position = 0  # minibatches of this rollout trained on
        self.rollouts = 0  # collected so far
        self.finished: list[tuple[float, int]] = []  # episodes of the current rollout

    def close(self) -> None:
        """Close the environments (worker processes with vectorization='async')."""
        self.batch.close()
        if self._evaluation is not None:
            self._evaluation.close()

    def evaluate(
        self, model: nn.Module, device: torch.device, seed: int, episodes: int
    ) -> dict[str, float]:
        """The greedy policy's mean return and episode length over `episodes` episodes
        seeded from `seed`, played by as many environments as the rollouts use (at most),
        of this step's vectorization (worker processes with 'async', kept for the next
        evaluation); see `rollouts.greedy_episodes`."""
        size = min(episodes, len(self.batch))
        if self._evaluation is None or len(self._evaluation) != size:
            if self._evaluation is not None:
                self._evaluation.close()
            self._evaluation = env_batch(
                self.vectorization,
                self.env_factory,
                size,
                self.batch.max_episode_steps,
                like=self.batch,
            )
        return greedy_episodes(model, self._evaluation, self.head, device, seed, episodes)

    @property
    def updates_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    def weight(self, batch: Any) -> int:
        index = self.position % self.minibatches if self.rollout is not None else 0
        return min(self.minibatch_size, self.size - index * self.minibatch_size)

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        metrics: dict[str, float | torch.Tensor] = {}
        if self.rollout is None:
            self._collect(model)
            if self.finished:
                metrics["episode_return"] = float(np.mean([r for r, _ in self.finished]))
                metrics["episode_length"] = float(np.mean([n for _, n in self.finished]))
        assert self.rollout is not None
        assert self.order is not None
        device = next(model.parameters()).device
        if self.rollout["observations"].device != device:  # restored from a checkpoint
            self.rollout = {key: value.to(device) for key, value in self.rollout.items()}
        epoch, index = divmod(self.position, self.minibatches)
        start = index * self.minibatch_size
        rows = self.order[epoch, start : start + self.minibatch_size].to(device)
        data = {key: self.rollout[key][rows] for key in ROLLOUT_KEYS}
        loss, stats = self._loss(model, data)
        metrics.update(stats)
        self.position += 1
        if self.position == self.updates_per_rollout:
            self.rollout = self.order = None
            self.position = 0
        return StepOutput(loss=loss, weight=len(rows), num_samples=len(rows), metrics=metrics)

    # -- the loss -------------------------------------------------------------------------------

    def _clip(self) -> float:
        if not self.clip_decay or not self.total_rollouts:
            return self.clip_range
        remaining = 1.0 - (self.rollouts - 1) / self.total_rollouts
        return self.clip_range * max(remaining, 0.0)

    def _loss(
        self, model: nn.Module, data: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        logits, values = policy_outputs(model, data["observations"])
        chosen = self.head.log_prob(logits, data["actions"])
        entropy = self.head.entropy(logits).mean()
        advantages = data["advantages"]
        if self.normalize_advantages and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        log_ratio = chosen - data["log_probs"]
        ratio = log_ratio.exp()
        eps = self._clip()
        policy_loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
        if self.value_clip is not None:
            old = data["values"]
            values = old + (values - old).clamp(-self.value_clip, self.value_clip)
        value_loss = ((values - data["returns"]) ** 2).mean()
        loss = policy_loss.mean() + self.value_coef * value_loss - self.entropy_coef * entropy
        with torch.no_grad():  # read at the next log step, not now
            stats: dict[str, float | torch.Tensor] = {
                "clip_fraction": ((ratio - 1).abs() > eps).float().mean(),
                "approx_kl": ((ratio - 1) - log_ratio).mean(),
                "value_loss": value_loss.detach(),
                "entropy": entropy.detach(),
            }
        return loss, stats

    # -- collecting a rollout ---------------------------------------------------------------------

    def _generators(self, device: torch.device) -> tuple[Any, Any]:
        """(CPU, device) generators for this rollout: the global ones, or under torchrun
        this rank's, derived from the shared stream and the rank."""
        if not self.job.enabled:
            return None, None
        base = int(torch.randint(2**62, ()).item()) + self.job.rank
        return torch.Generator().manual_seed(base), torch.Generator(device).manual_seed(base)

    @torch.no_grad()
    def _collect(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        cpu, sampling = self._generators(device)

        def draw_seed() -> int:
            return episode_seed(cpu)

        norms = normalizers(model)
        with in_eval_mode(model):
            columns = self._play(model, device, draw_seed, sampling, norms)
        if norms:  # the update starts from the statistics the rollout ended with
            flat = columns["observations"].flatten(0, 1)
            logits, values = policy_outputs(model, flat)
            chosen = self.head.log_prob(logits, columns["actions"].flatten(0, 1))
            columns["log_probs"] = chosen.view_as(columns["log_probs"])
            columns["values"] = values.view_as(columns["values"])
            columns["last_values"] = policy_outputs(model, columns["last_observations"])[1]
        advantages, returns = gae(
            columns["rewards"],
            columns["values"],
            columns["dones"],
            columns["last_values"],
            self.gamma,
            self.gae_lambda,
        )
        columns.update(advantages=advantages, returns=returns)
        self.rollout = {key: columns[key].flatten(0, 1) for key in ROLLOUT_KEYS}
        self.order = torch.stack(
            [torch.randperm(self.size, generator=cpu) for _ in range(self.epochs)]
        )
        self.position = 0
        self.rollouts += 1

    def _play(
        self,
        model: nn.Module,
        device: torch.device,
        draw_seed: Callable[[], int],
        sampling: torch.Generator | None,
        norms: list[Any],
    ) -> dict[str, torch.Tensor]:
        """`rollout_steps` lockstep steps of the environments: the rollout's columns, (T, N)."""
        batch = self.batch
        obs = np.stack(batch.observations) if batch.started else batch.start(draw_seed)
        keys = ("observations", "actions", "log_probs", "values", "rewards", "dones")
        columns: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        self.finished = []
        for t in range(self.rollout_steps):
            observations = torch.as_tensor(obs, device=device).float()
            for norm in norms:
                norm.update_statistics(observations, self.job)
            logits, values, actions = self._act(model, observations, t, sampling)
            chosen = self.head.log_prob(logits, actions)
            result = batch.step(self.head.to_env(actions), draw_seed)
            ended = np.logical_or(result.terminated, result.truncated)
            raw = result.rewards
            if self.reward_scale is not None:  # before the bootstrap, as SB3's VecNormalize
                raw = self.reward_scale(raw, ended)
            rewards = torch.as_tensor(raw, device=device, dtype=torch.float32)
            if result.final_observations:  # time-limit cuts: bootstrap from V(last state)
                cut = sorted(result.final_observations)
                last = np.stack([result.final_observations[i] for i in cut])
                bootstrap = policy_outputs(model, torch.as_tensor(last, device=device).float())
                rewards[cut] += self.gamma * bootstrap[1]
            columns["observations"].append(observations)
            columns["actions"].append(actions)
            columns["log_probs"].append(chosen)
            columns["values"].append(values)
            columns["rewards"].append(rewards)
            columns["dones"].append(torch.as_tensor(ended, device=device))
            self.finished += result.finished
            obs = result.observations
        out = {key: torch.stack(values) for key, values in columns.items()}
        out["last_observations"] = torch.as_tensor(obs, device=device).float()
        out["last_values"] = policy_outputs(model, out["last_observations"])[1]
        return out

    def _act(
        self, model: nn.Module, observations: torch.Tensor, t: int, sampling: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's logits and values at step `t` of the rollout, and the actions it
        samples: gSDE's (`features @ W`, a noise matrix per environment drawn at the
        rollout's start and every `sde_sample_freq` steps) where the policy returns
        `sde_features`, else the action head's."""
        out = model(observations)
        logits, values = with_value(read_policy(out))
        self.head.check(logits)
        features = out.get("sde_features") if isinstance(out, Mapping) else None
        if features is None:
            return logits, values, self.head.sample(logits, sampling)
        if t == 0 or (self.sde_sample_freq > 0 and t % self.sde_sample_freq == 0):
            self._weights = explorer(model).exploration_weights(len(logits), sampling)
        assert self._weights is not None  # drawn at t == 0
        return logits, values, self.head.explore(logits, features, self._weights)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The rollout in progress, its minibatch order and position, the environments."""
        state: dict[str, Any] = {
            "position": self.position,
            "rollouts": self.rollouts,
            "environments": self.batch.state_dict() if self.batch.started else None,
        }
        if self.reward_scale is not None:
            state["reward_scale"] = self.reward_scale.state_dict()
        if self.rollout is not None and self.order is not None:
            state["rollout"] = {key: value.cpu() for key, value in self.rollout.items()}
            state["order"] = self.order.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rollout = state.get("rollout")  # on the CPU; the next call moves it to the model's
        self.position, self.rollouts = int(state["position"]), int(state["rollouts"])
        if state["environments"] is not None:
            self.batch.load_state_dict(state["environments"])
        if self.reward_scale is not None and "reward_scale" in state:
            self.reward_scale.load_state_dict(state["reward_scale"])
        self.rollout = dict(rollout) if rollout is not None else None
        self.order = state.get("order")
        if self.rollout is not None and self.rollout["observations"].shape[0] != self.size:
            raise ValueError(
                f"cannot resume: the checkpoint's rollout holds "
                f"{self.rollout['observations'].shape[0]} steps, this run's {self.size} "
                "(envs x rollout_steps)"
            )
