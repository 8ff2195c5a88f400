"""How a policy's output becomes actions: one class per kind of action space.

A policy maps observations `(N, *obs_shape)` to one row of numbers per observation:

- discrete actions (`action_space.n`): `n` logits of a categorical distribution;
- continuous actions (a 1-d `Box` of `d` dimensions with finite bounds): `2 d` numbers, the
  means of a diagonal Gaussian and then the logs of its standard deviations (the built-in
  `actor_critic` with `gaussian=True` learns them as one parameter per dimension, as
  Stable-Baselines3's PPO does). Sampled actions are clipped to the bounds when the
  environment gets them; the log-probabilities are those of the unclipped samples, which
  the rollout keeps (as Stable-Baselines3 and CleanRL do).

`ActionHead.of(env)` picks the class from an environment's action space; PPO and policy
gradient then ask it for samples, greedy actions, log-probabilities and entropies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..training.steplog import NonFiniteError

__all__ = ["ActionHead", "Categorical", "Gaussian"]

LOG_2PI = math.log(2 * math.pi)


class ActionHead:
    """What PPO and policy gradient need of an action distribution."""

    outputs: int  # the policy's output width

    @staticmethod
    def of(env: Any) -> ActionHead:
        """The head for `env`'s action space (no space: categorical over the logits)."""
        space = getattr(env, "action_space", None)
        if space is None:
            return Categorical(None)
        scalar = not tuple(getattr(space, "shape", None) or ())  # not MultiBinary's n
        if scalar and isinstance(getattr(space, "n", None), (int, np.integer)):
            return Categorical(int(space.n))
        return Gaussian.of_box(space)

    def check(self, out: torch.Tensor) -> None:
        """A policy output of the wrong width is refused with what it should be; one that
        is not finite (weights that diverged through finite losses) stops the run, said as
        a non-finite loss is (torch's sampling said 'probability tensor contains either
        inf, nan or element < 0')."""
        if self.outputs and out.shape[-1] != self.outputs:
            raise ValueError(self.mismatch(out.shape[-1]))
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(
                "the policy's outputs are not finite (NaN or inf): its weights diverged; "
                "lower learning_rate or clip gradients (max_grad_norm)"
            )

    def mismatch(self, width: int) -> str:
        raise NotImplementedError

    def sample(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def explore(
        self, out: torch.Tensor, features: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """gSDE's sample (continuous actions only)."""
        raise ValueError(
            "the policy returns sde_features (gSDE exploration), which is for continuous "
            "actions; this environment's are discrete"
        )

    def greedy(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_env(self, actions: torch.Tensor) -> list[Any]:
        """The actions as the environments take them, one per environment."""
        raise NotImplementedError


class Categorical(ActionHead):
    """Discrete actions: `n` logits per observation (n None: whatever the policy gives)."""

    def __init__(self, n: int | None) -> None:
        self.outputs = n or 0

    def mismatch(self, width: int) -> str:
        return (
            f"the policy gives {width} logits per observation, the environment has "
            f"{self.outputs} actions"
        )

    def sample(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        probabilities = out.float().softmax(dim=-1)
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)

    def greedy(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(dim=-1)

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return out.float().log_softmax(dim=-1).gather(1, actions[:, None]).squeeze(1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        log_probs = out.float().log_softmax(dim=-1)
        return -(log_probs.exp() * log_probs).sum(dim=-1)

    def to_env(self, actions: torch.Tensor) -> list[Any]:
        return [int(a) for a in actions.tolist()]


class Gaussian(ActionHead):
    """Continuous actions in `[low, high]` (`d` dimensions): a diagonal Gaussian whose means
    and log standard deviations are the policy's `2 d` outputs."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        self.low = np.asarray(low, dtype=np.float32).reshape(-1)
        self.high = np.asarray(high, dtype=np.float32).reshape(-1)
        self.dims = len(self.low)
        self.outputs = 2 * self.dims

    @classmethod
    def of_box(cls, space: Any) -> Gaussian:
        low, high = getattr(space, "low", None), getattr(space, "high", None)
        shape = tuple(getattr(space, "shape", None) or ())
        if low is None or high is None or len(shape) != 1:
            raise ValueError(
                f"the action space {space!r} is neither discrete (action_space.n) nor a 1-d "
                "Box of continuous actions (action_space.low / high): mode='reinforcement' "
                "plays those two"
            )
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(
                f"the action space {space!r} has unbounded actions: a Gaussian policy's "
                "actions are clipped to the bounds, so they must be finite"
            )
        return cls(low, high)

    def mismatch(self, width: int) -> str:
        return (
            f"the policy gives {width} numbers per observation; the environment's "
            f"{self.dims}-d continuous actions need {self.outputs}: {self.dims} means, then "
            f"{self.dims} log standard deviations (the built-in actor_critic with "
            "gaussian=True gives them)"
        )

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = out.float().split(self.dims, dim=-1)
        return mean, log_std

    def sample(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        mean, log_std = self._split(out)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + log_std.exp() * noise).detach()  # a sample: no gradient through it

    def explore(
        self, out: torch.Tensor, features: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """gSDE's sample: the means plus `features @ W`, row i with environment i's noise
        matrix `weights[i]` (features x dims)."""
        mean = self._split(out)[0]
        noise = torch.bmm(features.float().unsqueeze(1), weights.float()).squeeze(1)
        return (mean + noise).detach()

    def greedy(self, out: torch.Tensor) -> torch.Tensor:
        return self._split(out)[0].detach()

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._split(out)
        z = (actions - mean) * (-log_std).exp()
        return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(dim=-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        log_std = self._split(out)[1]
        return (log_std + 0.5 + 0.5 * LOG_2PI).sum(dim=-1)

    def to_env(self, actions: torch.Tensor) -> list[Any]:
        values = actions.detach().cpu().numpy().astype(np.float32)
        return list(np.clip(values, self.low, self.high))
