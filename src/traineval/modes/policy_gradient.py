"""Policy gradient (REINFORCE with a learned baseline / advantage actor-critic) on whole episodes.

The policy is the model: observations `(N, *obs_shape)` in, action logits `(N, actions)`
out, or a tuple `(logits, value)` with a state-value head (`(N,)` or `(N, 1)`). Each loop
update collects `episodes` episodes with the current policy, run in lockstep (one batched
forward pass per time step over the episodes still running), and its loss is

    -mean_t(log pi(a_t|s_t) * A_t) + value_coef * mean_t((V(s_t) - G_t)^2)
    - entropy_coef * mean_t(entropy(pi(.|s_t)))

with discounted returns `G_t` (`gamma`), advantages `A_t = G_t - V(s_t)` (or `G_t` minus
the batch mean without a value head), normalised over the update when
`normalize_advantages`. An episode cut off by its time limit (truncated, not terminated)
bootstraps its return from `V` of the last state instead of pretending the episode ended.

Every random draw (episode seeds, sampled actions, dropout) comes from the global torch
generator, which checkpoints capture: a resumed run collects the episodes an uninterrupted
one would have. Under torchrun each rank plays its own episodes (seeds and actions from a
generator derived from the shared global stream and the rank) and the loop averages the
gradients; the means above (and the advantage normalisation, and the mean baseline) are
taken over every rank's time steps (one small all-reduce per update), so the update is the
one a single process would compute from all ranks' episodes.

`evaluate` (both algorithms' validation and test) plays greedy episodes.

The mode (`PolicyGradient`, registered as "policy_gradient"): each loop update collects
`episodes_per_update` whole episodes; an epoch is `updates_per_epoch` updates. Its other
settings are those both algorithms share (`traineval.modes.episodic`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config.checks import Int
from ..config.training_config import setting
from ..system.distributed import Distributed
from ..training.batches import in_eval_mode
from .actions import ActionHead
from .base import StepOutput, Updates
from .contract import Context, ModePlan, MonitorChoice, register
from .episodic import Episodic
from .rollouts import episode_seed, policy_and_value

__all__ = ["PolicyGradient", "PolicyGradientStep"]


@register
@dataclasses.dataclass(frozen=True)
class PolicyGradient(Episodic):
    """Policy gradient with a learned baseline on whole episodes the policy plays
    (`traineval.modes.policy_gradient`); `mode: reinforcement` with a policy-gradient
    setting (or `algorithm: policy_gradient`) is this mode."""

    name: ClassVar[str] = "policy_gradient"
    algorithm: ClassVar[str] = "policy_gradient"
    accumulation_refusal: ClassVar[str | None] = "raise episodes_per_update for larger updates"

    # whole episodes collected for each update
    episodes_per_update: int = setting(8, Int(1))
    # updates per epoch
    updates_per_epoch: int = setting(10, Int(1))

    def step(
        self, env_factory: Callable[[], Any], *, episodes: int | None = None, job: Any = None
    ) -> PolicyGradientStep:
        """The step these settings describe (`episodes` overrides the episodes per update,
        e.g. 1 where the step only evaluates)."""
        count = self.episodes_per_update if episodes is None else episodes
        return PolicyGradientStep(env_factory, self, episodes=count, job=job)

    def greedy(
        self, factory: Callable[[], Any], device: torch.device
    ) -> Callable[[nn.Module, int], dict[str, float]]:
        player = PolicyGradientStep(factory, self, episodes=1)
        return lambda model, seed: player.evaluate(model, device, seed=seed)

    def plan(self, ctx: Context) -> ModePlan:
        factory = self.environment_factory(ctx.train_data)
        name, minimize = self.monitor_of(ctx)
        # several forward passes per update: no DDP wrapper, the loop averages the gradients;
        # the ranks share one stream (each update's base seed, which their episodes derive from)
        return ModePlan(
            self.step(factory, job=ctx.job),
            loader=Updates(self.updates_per_epoch),
            wraps_model=False,
            evaluate=self.validation(self.greedy(factory, ctx.device)),
            monitor=MonitorChoice(name, minimize),
            shared_seed=True,
        )


class PolicyGradientStep:
    """One policy-gradient update from freshly collected episodes; see the module docstring."""

    def __init__(
        self,
        env_factory: Callable[[], Any],
        settings: Episodic,
        *,
        episodes: int,
        job: Distributed | None = None,
    ) -> None:
        """`episodes` per update; the loss's numbers (`gamma`, `value_coef`, ...) and the
        evaluation's are `settings`'."""
        self.env_factory = env_factory
        self.job = job or Distributed()
        self.envs = [env_factory() for _ in range(episodes)]
        self.gamma = settings.gamma
        self.value_coef = settings.value_coef
        self.entropy_coef = settings.entropy_coef
        self.normalize_advantages = settings.normalize_advantages
        self.max_episode_steps = settings.max_episode_steps
        self.eval_episodes = settings.eval_episodes
        self._eval_envs: list[Any] = []
        if not hasattr(self.envs[0], "reset") or not hasattr(self.envs[0], "step"):
            raise ValueError(
                f"mode={settings.name!r} needs an environment factory: a callable returning "
                "an object with gymnasium's reset() and step(), e.g. "
                "traineval.modes.envs.CartPole"
            )
        self.head = ActionHead.of(self.envs[0])  # categorical, or Gaussian for a Box

    def weight(self, batch: Any) -> int:
        return 1

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        device = next(model.parameters()).device
        seeds = sampling = None
        if self.job.enabled:  # this rank's own episodes, from the shared stream and the rank
            base = int(torch.randint(2**62, ()).item()) + self.job.rank
            seeds = torch.Generator().manual_seed(base)
            sampling = torch.Generator(device=device).manual_seed(base)
        episodes = self._play(model, self.envs, device, False, seeds, sampling)
        log_probs = torch.cat([e["log_probs"] for e in episodes])
        entropies = torch.cat([e["entropies"] for e in episodes])
        returns = torch.cat([self._returns(e) for e in episodes]).to(device)
        values = [e["values"] for e in episodes]
        if self.job.enabled:
            loss = self._loss_over_ranks(log_probs, entropies, returns, values)
        else:
            if values[0] is not None:
                value = torch.cat(values)
                advantages = returns - value.detach()
                value_loss = F.mse_loss(value, returns)
            else:
                advantages = returns - returns.mean()
                value_loss = torch.zeros((), device=device)
            if self.normalize_advantages and advantages.numel() > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = -(log_probs * advantages).mean()
            entropy = entropies.mean()
            loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        metrics: dict[str, float | torch.Tensor] = {  # host numbers: rewards stay on the host
            "episode_return": float(np.mean([sum(e["rewards"]) for e in episodes])),
            "episode_length": float(np.mean([len(e["rewards"]) for e in episodes])),
        }
        return StepOutput(loss=loss, weight=1, num_samples=int(log_probs.numel()), metrics=metrics)

    def _loss_over_ranks(
        self,
        log_probs: torch.Tensor,
        entropies: torch.Tensor,
        returns: torch.Tensor,
        values: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """This rank's part of the loss over every rank's time steps, times the world size
        (the loop averages the ranks' gradients): means, the mean baseline and the advantage
        normalisation use all ranks' steps."""
        job = self.job
        n, returns_sum = job.sum([float(returns.numel()), float(returns.sum())])
        if values[0] is not None:
            value = torch.cat(values)  # type: ignore[arg-type]
            advantages = returns - value.detach()
            value_sum = ((value - returns) ** 2).sum()
        else:
            advantages = returns - returns_sum / n
            value_sum = torch.zeros((), device=returns.device)
        if self.normalize_advantages and n > 1:
            total, squares = job.sum([float(advantages.sum()), float((advantages**2).sum())])
            mean = total / n
            std = max((squares - n * mean * mean) / (n - 1), 0.0) ** 0.5  # unbiased, as .std()
            advantages = (advantages - mean) / (std + 1e-8)
        scale = job.world_size / n
        policy = -(log_probs * advantages).sum()
        entropy = entropies.sum()
        return (policy + self.value_coef * value_sum - self.entropy_coef * entropy) * scale

    def _returns(self, episode: dict[str, Any]) -> torch.Tensor:
        """Discounted returns, bootstrapped from V(last state) when the time limit cut it off."""
        rewards = episode["rewards"]
        running = episode["bootstrap"]
        out = np.zeros(len(rewards), dtype=np.float64)
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + self.gamma * running
            out[t] = running
        return torch.as_tensor(out, dtype=torch.float32)

    def _play(
        self,
        model: nn.Module,
        envs: list[Any],
        device: torch.device,
        greedy: bool,
        seeds: torch.Generator | None = None,
        sampling: torch.Generator | None = None,
    ) -> list[dict[str, Any]]:
        """Run one episode in each env in lockstep; records what the loss needs.

        Episode seeds come from `seeds`, sampled actions from `sampling` (a generator on the
        model's device); either defaults to the global generator.
        """
        observations = []
        for env in envs:
            seed = episode_seed(seeds)
            observations.append(env.reset(seed=seed)[0])
        records: list[dict[str, Any]] = [
            {"log_probs": [], "entropies": [], "values": [], "rewards": [], "bootstrap": 0.0}
            for _ in envs
        ]
        active = list(range(len(envs)))
        steps = 0
        while active:
            obs = torch.as_tensor(np.stack([observations[i] for i in active]), device=device)
            logits, value = policy_and_value(model, obs.float())
            head = self.head
            head.check(logits)
            actions = head.greedy(logits) if greedy else head.sample(logits, sampling)
            chosen = head.log_prob(logits, actions)
            entropy = head.entropy(logits)
            steps += 1
            still: list[int] = []
            for row, (i, action) in enumerate(zip(active, head.to_env(actions), strict=True)):
                record = records[i]
                record["log_probs"].append(chosen[row])
                record["entropies"].append(entropy[row])
                record["values"].append(None if value is None else value[row])
                obs_i, reward, terminated, truncated, _ = envs[i].step(action)
                record["rewards"].append(float(reward))
                observations[i] = obs_i
                cut = truncated or steps >= self.max_episode_steps
                if not terminated and not cut:
                    still.append(i)
                elif cut and not terminated and value is not None and not greedy:
                    record["cut_observation"] = obs_i
            active = still
        return [_episode(record, model, device) for record in records]

    def evaluate(
        self, model: nn.Module, device: torch.device, seed: int = 12345
    ) -> dict[str, float]:
        """Mean return and episode length of the greedy policy over `eval_episodes` episodes.

        Its episode seeds come from a generator of its own, seeded with `seed` (training's
        validation passes a fresh one each time; a final test another), so evaluating does
        not change what training draws.
        """
        if not self._eval_envs:
            self._eval_envs = [self.env_factory() for _ in range(self.eval_episodes)]
        seeds = torch.Generator().manual_seed(seed)
        with in_eval_mode(model), torch.no_grad():
            episodes = self._play(model, self._eval_envs, device, greedy=True, seeds=seeds)
        returns = [sum(e["rewards"]) for e in episodes]
        lengths = [len(e["rewards"]) for e in episodes]
        return {"return": float(np.mean(returns)), "episode_length": float(np.mean(lengths))}


def _episode(record: dict[str, Any], model: nn.Module, device: torch.device) -> dict[str, Any]:
    """A played episode as the loss reads it: its steps' tensors stacked, and the value of
    the state a time limit cut it at (V(s), the return's bootstrap) where there is one."""
    has_value = record["values"][0] is not None
    if "cut_observation" in record and has_value:
        last = torch.as_tensor(record["cut_observation"], device=device)[None].float()
        with torch.no_grad():
            record["bootstrap"] = float(policy_and_value(model, last)[1][0])  # type: ignore[index]
    return {
        "log_probs": torch.stack(record["log_probs"]),
        "entropies": torch.stack(record["entropies"]),
        "values": torch.stack(record["values"]) if has_value else None,
        "rewards": record["rewards"],
        "bootstrap": record["bootstrap"],
    }
