"""Reinforcement mode: policy gradient (REINFORCE with a learned baseline / advantage actor-critic).

The policy is the model: observations `(N, *obs_shape)` in, action logits `(N, actions)`
out, or a tuple `(logits, value)` with a state-value head (`(N,)` or `(N, 1)`). Each loop
update collects `episodes_per_update` episodes with the current policy, run in lockstep
(one batched forward pass per time step over the episodes still running), and its loss is

    -mean_t(log pi(a_t|s_t) * A_t) + value_coef * mean_t((V(s_t) - G_t)^2)
    - entropy_coef * mean_t(entropy(pi(.|s_t)))

with discounted returns `G_t` (`gamma`), advantages `A_t = G_t - V(s_t)` (or `G_t` minus
the batch mean without a value head), normalised over the update when
`normalize_advantages`. An episode cut off by its time limit (truncated, not terminated)
bootstraps its return from `V` of the last state instead of pretending the episode ended.

So the loop's optimizer, schedule, clipping, checkpoints and loggers work on policy updates
as on any other. Every random draw (episode seeds, sampled actions, dropout) comes from the
global torch generator, which checkpoints capture: a resumed run collects the episodes an
uninterrupted one would have. The training episodes' mean return and length are logged as
`train_episode_return` and `train_episode_length`. Validation (`evaluate`) plays
`eval_episodes` episodes with the greedy policy and reports `return` (mean episode
return) and `episode_length`; each validation plays fresh episodes (seeds drawn from the
checkpointed generator), so the best checkpoint is not the luckiest fit to one fixed set,
and the final test (`Reinforcement.score`) plays yet other ones.

Under torchrun each rank plays its own `episodes_per_update` episodes (seeds and actions
from a generator derived from the shared global stream and the rank) and the loop averages
the ranks' gradients; the means above (and the advantage normalisation, and the mean
baseline) are taken over every rank's time steps (one small all-reduce per update), so the
update is the one a single process would compute from all ranks' episodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..batches import prediction_of
from ..checks import boolean, fail, integer, number
from ..distributed import Distributed
from ..envs import checked, make_env
from .base import StepOutput, Updates
from .contract import Context, Mode, ModePlan, MonitorChoice, register

__all__ = ["PolicyGradientStep", "Reinforcement"]

MONITORS = ("val_return", "val_episode_length", "train_loss")


@register
@dataclasses.dataclass(frozen=True)
class Reinforcement(Mode):
    """Policy gradient on episodes the policy plays (`traineval.modes.reinforcement`).

    `train()` takes an environment factory (or a name, e.g. "CartPole") in the train
    loader's place, or none when `environment` names one. Each epoch is `updates_per_epoch`
    updates of `episodes_per_update` episodes; validation plays `eval_episodes` greedy ones.
    """

    name: ClassVar[str] = "reinforcement"
    compile_refusal: ClassVar[str | None] = (
        "an update is one small forward pass per environment step over a changing number of "
        "running episodes: the environments bound it, and the changing batch would recompile"
    )
    accumulation_refusal: ClassVar[str | None] = "raise episodes_per_update for larger updates"
    shards: ClassVar[bool] = False
    episodes_per_update: int = 8
    updates_per_epoch: int = 10
    gamma: float = 0.99
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    normalize_advantages: bool = True
    max_episode_steps: int = 1000
    eval_episodes: int = 10
    environment: str | None = None

    def __post_init__(self) -> None:
        for name in ("episodes_per_update", "updates_per_epoch", "max_episode_steps"):
            integer(self.key(name), getattr(self, name), minimum=1)
        integer(self.key("eval_episodes"), self.eval_episodes, minimum=1)
        number(self.key("gamma"), self.gamma, minimum=0)
        if self.gamma > 1:
            fail(self.key("gamma"), self.gamma, "expected a discount in [0, 1]")
        number(self.key("value_coef"), self.value_coef, minimum=0)
        number(self.key("entropy_coef"), self.entropy_coef, minimum=0)
        boolean(self.key("normalize_advantages"), self.normalize_advantages)
        if self.environment is not None and not (
            isinstance(self.environment, str) and self.environment
        ):
            fail(self.key("environment"), self.environment, "expected a name, e.g. 'CartPole'")

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
        """The step these settings describe (`episodes` overrides the episodes per update,
        e.g. 1 where the step only evaluates)."""
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
            "traineval.envs.CartPole), or a name ('CartPole'); got "
            f"{type(source).__name__}"
        )

    def score(
        self, model: nn.Module, data: Any, device: torch.device, *, seed: int = 0
    ) -> dict[str, float]:
        """The greedy policy on `eval_episodes` fresh episodes of `data` (an environment
        factory or name; None: `environment`), seeded apart from validation's."""
        step = self.step(self.environment_factory(data), episodes=1)
        return step.evaluate(model.to(device), device, seed=seed + 54321)

    def plan(self, ctx: Context) -> ModePlan:
        step = self.step(self.environment_factory(ctx.train_data), job=ctx.job)
        c = ctx.config
        name = "val_return" if c.monitor_metric == "val_loss" else c.monitor_metric
        minimize = c.minimize_monitor if name == c.monitor_metric else False
        device = ctx.device
        # several forward passes per update: no DDP wrapper, the loop averages the gradients;
        # the ranks share one stream (each update's base seed, which their episodes derive from)
        return ModePlan(
            step,
            loader=Updates(self.updates_per_epoch),
            wraps_model=False,
            evaluate=lambda model: step.evaluate(model, device, seed=_fresh_seed()),
            monitor=MonitorChoice(name, minimize),
            shared_seed=True,
        )


class PolicyGradientStep:
    """One policy-gradient update from freshly collected episodes; see the module docstring."""

    def __init__(
        self,
        env_factory: Callable[[], Any],
        *,
        episodes: int = 8,
        gamma: float = 0.99,
        value_coef: float = 0.5,
        entropy_coef: float = 0.01,
        normalize_advantages: bool = True,
        max_episode_steps: int = 1000,
        eval_episodes: int = 10,
        job: Distributed | None = None,
    ) -> None:
        self.env_factory = env_factory
        self.job = job or Distributed()
        self.envs = [env_factory() for _ in range(episodes)]
        self.gamma = gamma
        self.value_coef = value_coef
        self.entropy_coef = entropy_coef
        self.normalize_advantages = normalize_advantages
        self.max_episode_steps = max_episode_steps
        self.eval_episodes = eval_episodes
        self._eval_envs: list[Any] = []
        if not hasattr(self.envs[0], "reset") or not hasattr(self.envs[0], "step"):
            raise ValueError(
                "mode='reinforcement' needs an environment factory: a callable returning an "
                "object with gymnasium's reset() and step(), e.g. traineval.envs.CartPole"
            )

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
            seed = int(torch.randint(2**31 - 1, (), generator=seeds).item())
            observations.append(env.reset(seed=seed)[0])
        records: list[dict[str, Any]] = [
            {"log_probs": [], "entropies": [], "values": [], "rewards": [], "bootstrap": 0.0}
            for _ in envs
        ]
        active = list(range(len(envs)))
        steps = 0
        while active:
            obs = torch.as_tensor(np.stack([observations[i] for i in active]), device=device)
            logits, value = _policy(model, obs.float())
            if greedy:
                actions = logits.argmax(dim=-1)
            else:
                probs = logits.float().softmax(dim=-1)
                actions = torch.multinomial(probs, 1, generator=sampling).squeeze(1)
            log_probs = logits.float().log_softmax(dim=-1)
            chosen = log_probs.gather(1, actions[:, None]).squeeze(1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
            steps += 1
            still: list[int] = []
            for row, (i, action) in enumerate(zip(active, actions.tolist(), strict=True)):
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
        out = []
        for record in records:
            has_value = record["values"][0] is not None
            if "cut_observation" in record and has_value:
                last = torch.as_tensor(record["cut_observation"], device=device)[None].float()
                with torch.no_grad():
                    record["bootstrap"] = float(_policy(model, last)[1][0])  # type: ignore[index]
            out.append(
                {
                    "log_probs": torch.stack(record["log_probs"]),
                    "entropies": torch.stack(record["entropies"]),
                    "values": torch.stack(record["values"]) if has_value else None,
                    "rewards": record["rewards"],
                    "bootstrap": record["bootstrap"],
                }
            )
        return out

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
        was_training = model.training
        model.eval()
        seeds = torch.Generator().manual_seed(seed)
        try:
            with torch.no_grad():
                episodes = self._play(model, self._eval_envs, device, greedy=True, seeds=seeds)
        finally:
            model.train(was_training)
        returns = [sum(e["rewards"]) for e in episodes]
        lengths = [len(e["rewards"]) for e in episodes]
        return {"return": float(np.mean(returns)), "episode_length": float(np.mean(lengths))}


def _fresh_seed() -> int:
    """Episode seeds for one validation: fresh each time (the best checkpoint is picked on
    episodes it has not been picked on before), drawn from the global generator, whose state
    checkpoints capture and which the loop puts back after evaluating: a resumed run
    validates on the episodes an uninterrupted one would."""
    return int(torch.randint(2**31 - 1, ()).item())


def _policy(model: nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's logits and its value estimate, if it makes one: a model returns logits,
    `(logits, value)`, or a mapping with `logits` (or another prediction key) and `value`."""
    out = model(obs)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        logits, value = out
        return logits, value.reshape(-1).float()
    value = out.get("value") if isinstance(out, Mapping) else None
    return prediction_of(out), value.reshape(-1).float() if value is not None else None
