"""Policies for reinforcement mode: an actor-critic MLP and running observation normalisation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ActorCritic", "RunningNorm"]

SDE_EPSILON = 1e-6  # added to the gSDE variance, as Stable-Baselines3


class RunningNorm(nn.Module):
    """Normalises observations by a running mean and variance: `clamp((x - mean) /
    sqrt(var + 1e-8), -clip, clip)`.

    The statistics are buffers (saved with the model, used at evaluation alike) that only
    `update_statistics` changes: reinforcement mode's PPO calls it with the observations
    the policy plays on (as Stable-Baselines3's VecNormalize does), merging them over the
    ranks under torchrun. Forward passes never change them.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: int | Sequence[int], clip: float = 10.0) -> None:
        super().__init__()
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        self.clip = clip
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("var", torch.ones(size, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update_statistics(self, observations: torch.Tensor, job: Any = None) -> None:
        """Fold a batch `(N, *shape)` into the statistics (summed over `job`'s ranks)."""
        x = observations.detach().to(torch.float64).reshape(-1, *tuple(self.mean.shape))
        n = torch.tensor([float(len(x))], dtype=torch.float64, device=x.device)
        sums = torch.cat([n, x.sum(0).flatten(), (x * x).sum(0).flatten()])
        if job is not None and job.enabled:
            sums = torch.tensor(job.sum(sums.tolist()), dtype=torch.float64, device=x.device)
        size = self.mean.numel()
        count = sums[0]
        batch_mean = (sums[1 : 1 + size] / count).view_as(self.mean)
        batch_var = (sums[1 + size :] / count).view_as(self.mean) - batch_mean**2
        total = self.count + count
        delta = batch_mean - self.mean
        moments = self.var * self.count + batch_var * count + delta**2 * self.count * count / total
        self.mean.add_(delta * count / total)
        self.var.copy_(moments / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var.to(x.dtype) + 1e-8)
        return normalised.clamp(-self.clip, self.clip)


def _tanh_mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """A policy for reinforcement mode: tanh MLP bodies, action logits and a state value.

    `separate=True` gives the policy and the value their own body (as Stable-Baselines3's
    MlpPolicy); `orthogonal_init=True` initialises as it does (orthogonal weights with gain
    sqrt(2) in the bodies, 0.01 on the logits, 1 on the value; zero biases);
    `normalize_observations=True` puts a `RunningNorm` in front. `gaussian=True` is the
    policy for continuous actions: of its `output_dim` outputs the first half are the
    means of a diagonal Gaussian (a linear head) and the second half the logs of its
    standard deviations, one learned parameter per dimension (`log_std_init`), whatever
    the observation (as Stable-Baselines3's PPO).

    `sde=True` (with `gaussian=True`) explores by generalised state-dependent exploration
    (gSDE, Raffin et al., 2022, as Stable-Baselines3's `use_sde`): the action's noise is
    `features @ W`, with `features` the policy body's last hidden layer and `W` a noise
    matrix per environment drawn from N(0, exp(sde_log_std)^2) (`exploration_weights`),
    held for several steps (the mode's `sde_sample_freq`), so exploration is smooth in
    time and depends on the state. The policy then returns a mapping: `logits` (the means,
    then the log standard deviations of the action that noise gives,
    `0.5 log(features^2 @ std^2 + 1e-6)`), `value`, and `sde_features`.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_sizes: Sequence[int] = (64,),
        separate: bool = False,
        orthogonal_init: bool = False,
        normalize_observations: bool = False,
        gaussian: bool = False,
        log_std_init: float = 0.0,
        sde: bool = False,
    ) -> None:
        super().__init__()
        if sde and not gaussian:
            raise ValueError(
                "sde=True is gSDE exploration for continuous actions: it needs gaussian=True"
            )
        if gaussian and output_dim % 2:
            raise ValueError(
                f"output_dim={output_dim} is invalid with gaussian=True: expected an even "
                "number (the means, then as many log standard deviations)"
            )
        sizes = [input_dim, *hidden_sizes]
        self.normalize = RunningNorm(input_dim) if normalize_observations else None
        self.body = _tanh_mlp(sizes)
        self.value_body = _tanh_mlp(sizes) if separate else None
        width = hidden_sizes[-1] if hidden_sizes else input_dim
        self.policy = nn.Linear(width, output_dim // 2 if gaussian else output_dim)
        dims = output_dim // 2
        self.log_std = (
            nn.Parameter(torch.full((dims,), float(log_std_init))) if gaussian and not sde else None
        )
        self.sde_log_std = (
            nn.Parameter(torch.full((width, dims), float(log_std_init))) if sde else None
        )
        self.value = nn.Linear(width, 1)
        if orthogonal_init:
            self._orthogonal()

    def _orthogonal(self) -> None:
        gains = [(self.policy, 0.01), (self.value, 1.0)]
        for body in (self.body, self.value_body):
            if body is not None:
                gains += [(m, math.sqrt(2)) for m in body if isinstance(m, nn.Linear)]
        for layer, gain in gains:
            nn.init.orthogonal_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> Any:
        """`(logits, value)`; with `sde=True` a mapping with `sde_features` too."""
        x = x.flatten(1)
        if self.normalize is not None:
            x = self.normalize(x)
        h = self.body(x)
        v = h if self.value_body is None else self.value_body(x)
        out = self.policy(h)
        if self.sde_log_std is not None:  # the features are not trained through the noise
            features = h.detach()
            variance = features.square() @ self.sde_log_std.exp().square()
            out = torch.cat([out, 0.5 * torch.log(variance + SDE_EPSILON)], dim=-1)
            return {"logits": out, "value": self.value(v), "sde_features": features}
        if self.log_std is not None:
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out, self.value(v)

    def exploration_weights(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` gSDE noise matrices `(n, features, action dims)`, each entry drawn from
        N(0, exp(sde_log_std)^2) (`sde=True` only)."""
        if self.sde_log_std is None:
            raise ValueError("exploration_weights: this ActorCritic was made without sde=True")
        std = self.sde_log_std.detach().exp()
        return torch.randn((n, *std.shape), generator=generator, device=std.device) * std
