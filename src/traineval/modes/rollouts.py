"""Environments stepped in lockstep, and generalised advantage estimation over a rollout.

`EnvBatch` runs `n` environments side by side (one batched forward pass of the policy per
time step, as Stable-Baselines3's DummyVecEnv or gymnasium's SyncVectorEnv do), resetting
each as its episode ends. Its state is small and safe to checkpoint: for each environment
the seed of its current episode and the actions taken since. Restoring resets each
environment with that seed and replays the actions, which puts any environment that is
deterministic given its seed and actions (gymnasium's contract) back where it was, without
pickling it (a checkpoint stays loadable with `weights_only`, running no code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..training.batches import in_eval_mode, prediction_of

__all__ = [
    "EnvBatch",
    "StepResult",
    "episode_seed",
    "gae",
    "greedy_episodes",
    "policy_and_value",
    "read_policy",
]

DrawSeed = Callable[[], int]
Reached = dict[int, tuple[np.ndarray, float]]  # environment -> (observation, replayed return)


def episode_seed(generator: torch.Generator | None = None) -> int:
    """An episode's seed, drawn from `generator` (None: the global generator), so that the
    run's random stream decides its episodes."""
    return int(torch.randint(2**31 - 1, (), generator=generator).item())


@dataclasses.dataclass
class StepResult:
    """One lockstep step of every environment.

    Attributes:
        observations: the next observation of each environment (after a reset where the
            episode ended: the new episode's first).
        rewards: float64, one per environment.
        terminated: the episode ended in a terminal state (no value beyond it).
        truncated: the episode was cut off (time limit) in a non-terminal state.
        final_observations: environment index -> the observation the truncated episode
            ended on (its value bootstraps the return).
        finished: (return, length) of each episode that ended at this step.
    """

    observations: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observations: dict[int, np.ndarray]
    finished: list[tuple[float, int]]


class EnvBatch:
    """`n` environments from `factory`, stepped together in this process; see the module
    docstring (`traineval.modes.env_workers.AsyncEnvBatch` steps them in worker processes,
    with the same bookkeeping and state).

    Each new episode's seed comes from `draw_seed` (in environment order), so a run's
    random stream decides every episode. An episode longer than `max_episode_steps` is
    truncated there.
    """

    def __init__(self, factory: Callable[[], Any], n: int, max_episode_steps: int) -> None:
        self.envs = [factory() for _ in range(n)]
        self._track(n, max_episode_steps)

    def _track(self, n: int, max_episode_steps: int) -> None:
        """No episodes yet: each environment's seed, actions, return and observation."""
        self.max_episode_steps = max_episode_steps
        self.seeds: list[int | None] = [None] * n
        self.actions: list[list[Any]] = [[] for _ in range(n)]
        self.returns = [0.0] * n
        self.observations: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def spaces(self) -> Any:
        """An object with the environments' `action_space` (and `observation_space`)."""
        return self.envs[0]

    @property
    def started(self) -> bool:
        return bool(self.observations)

    # -- what a backend does: here one environment after another, in this process ----------

    def _step_all(self, actions: list[Any]) -> list[tuple[Any, float, bool, bool]]:
        """Each environment's (observation, reward, terminated, truncated) after its action."""
        return [tuple(env.step(action)[:4]) for env, action in zip(self.envs, actions, strict=True)]

    def _reset_some(self, seeds: dict[int, int], replays: Mapping[int, list[Any]]) -> Reached:
        """Reset environment i with seeds[i], then replay replays[i] (a restored episode's
        actions) where given; for each, the observation reached and the replayed return."""
        reached: Reached = {}
        for i, seed in seeds.items():
            observation = self.envs[i].reset(seed=seed)[0]
            total = 0.0
            for action in replays.get(i, ()):
                observation, reward, *_ = self.envs[i].step(action)
                total += float(reward)
            reached[i] = (np.asarray(observation), total)
        return reached

    def close(self) -> None:
        for env in self.envs:
            getattr(env, "close", lambda: None)()

    # -- episodes -------------------------------------------------------------------------------

    def start(self, draw_seed: DrawSeed) -> np.ndarray:
        """Reset every environment (or replay a restored state); the first observations."""
        replays = {i: self.actions[i] for i, seed in enumerate(self.seeds) if seed is not None}
        for i, seed in enumerate(self.seeds):
            if seed is None:  # a new episode
                self.seeds[i], self.actions[i] = draw_seed(), []
        reached = self._reset_some(dict(enumerate(self.seeds)), replays)  # type: ignore[arg-type]
        self.observations = [reached[i][0] for i in range(len(self))]
        self.returns = [reached[i][1] for i in range(len(self))]
        return np.stack(self.observations)

    def step(self, actions: list[Any], draw_seed: DrawSeed) -> StepResult:
        """Step each environment with its action; reset those whose episode ended."""
        n = len(self)
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        final: dict[int, np.ndarray] = {}
        finished: list[tuple[float, int]] = []
        new: dict[int, int] = {}  # environment -> its next episode's seed
        for i, (observation, reward, ended, cut) in enumerate(self._step_all(actions)):
            self.actions[i].append(actions[i])
            rewards[i] = float(reward)
            self.returns[i] += float(reward)
            length = len(self.actions[i])
            cut = bool(cut) or length >= self.max_episode_steps
            terminated[i], truncated[i] = bool(ended), cut and not ended
            if ended or cut:
                finished.append((self.returns[i], length))
                if truncated[i]:
                    final[i] = np.asarray(observation)
                new[i] = self.seeds[i] = draw_seed()
                self.actions[i], self.returns[i] = [], 0.0
            self.observations[i] = np.asarray(observation)
        for i, (observation, _) in (self._reset_some(new, {}) if new else {}).items():
            self.observations[i] = observation
        return StepResult(
            np.stack(self.observations), rewards, terminated, truncated, final, finished
        )

    def state_dict(self) -> dict[str, Any]:
        """Each environment's episode seed and the actions since (tensors and ints only:
        int64 for discrete actions, float64 rows for continuous ones, exact for float32)."""
        return {
            "seeds": [-1 if seed is None else int(seed) for seed in self.seeds],
            "actions": [torch.as_tensor(_actions_array(a)) for a in self.actions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved state; the next `start` replays it."""
        if len(state["seeds"]) != len(self):
            raise ValueError(
                f"cannot resume: the checkpoint ran {len(state['seeds'])} environments, this "
                f"run {len(self)}"
            )
        self.seeds = [None if seed < 0 else int(seed) for seed in state["seeds"]]
        self.actions = [_actions_list(actions) for actions in state["actions"]]
        self.observations = []


def _actions_array(actions: list[Any]) -> np.ndarray:
    if actions and np.ndim(actions[0]) > 0:  # continuous: one float32 row per step
        return np.stack(actions).astype(np.float64)
    return np.asarray(actions, dtype=np.int64)


def _actions_list(saved: torch.Tensor) -> list[Any]:
    if saved.is_floating_point():
        return [row.astype(np.float32) for row in saved.numpy()]
    return [int(a) for a in saved.tolist()]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_values: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over a `(T, N)` rollout.

    `dones[t]` marks an episode that ended at step t (its next value is not used: a
    truncated episode's reward already holds its bootstrapped value); `last_values` are the
    values of the observations after the last step. Returns (advantages, returns), with
    returns = advantages + values (the value targets).
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_values)
    next_values = last_values
    for t in range(steps - 1, -1, -1):
        alive = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_values * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
        next_values = values[t]
    return advantages, advantages + values


def policy_and_value(
    model: nn.Module, obs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's logits and its value estimate, if it makes one: a model returns logits,
    `(logits, value)`, or a mapping with `logits` (or another prediction key) and `value`."""
    return read_policy(model(obs))


def read_policy(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`policy_and_value` of a policy's output `out`."""
    if isinstance(out, (tuple, list)) and len(out) == 2:
        logits, value = out
        return logits, value.reshape(-1).float()
    value = out.get("value") if isinstance(out, Mapping) else None
    return prediction_of(out), value.reshape(-1).float() if value is not None else None


@torch.no_grad()
def greedy_episodes(
    model: nn.Module, batch: EnvBatch, head: Any, device: torch.device, seed: int, episodes: int
) -> dict[str, float]:
    """Mean return and length of `episodes` greedy episodes played by `batch`'s
    environments, episode k seeded with the k-th draw of a generator seeded with `seed`
    (policy gradient's evaluation draws the same), each environment taking the next episode
    as its last one ends. The batch steps in lockstep, so an environment with no episode
    left plays on into ones that are not counted until the last counted one ends."""
    draws = torch.Generator().manual_seed(seed)
    seeds = [episode_seed(draws) for _ in range(episodes)]
    started: list[int | None] = []  # the episode each reset began, in the batch's order

    def draw_seed() -> int:
        k = len(started)
        started.append(k if k < episodes else None)
        return seeds[k] if k < episodes else 0  # past the counted episodes: any seed

    batch._track(len(batch), batch.max_episode_steps)
    observations = batch.start(draw_seed)
    playing = list(started)  # environment i plays episode playing[i]
    results: dict[int, tuple[float, int]] = {}
    waves = -(-episodes // len(batch))  # each ends within max_episode_steps
    with in_eval_mode(model):
        for _ in range(waves * batch.max_episode_steps):
            if len(results) == episodes:
                break
            obs = torch.as_tensor(observations, device=device).float()
            logits = policy_and_value(model, obs)[0]
            head.check(logits)
            step = batch.step(head.to_env(head.greedy(logits)), draw_seed)
            ended = np.flatnonzero(np.logical_or(step.terminated, step.truncated)).tolist()
            fresh = started[len(started) - len(ended) :]  # the resets of this step, in order
            for i, episode, new in zip(ended, step.finished, fresh, strict=True):
                counted, playing[i] = playing[i], new
                if counted is not None:
                    results[counted] = episode
            observations = step.observations
    if len(results) < episodes:  # cannot happen: every episode is cut at max_episode_steps
        raise RuntimeError(f"greedy_episodes: {len(results)} of {episodes} episodes ended")
    returns, lengths = zip(*results.values(), strict=True)
    return {"return": float(np.mean(returns)), "episode_length": float(np.mean(lengths))}
