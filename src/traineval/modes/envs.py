"""Environments for reinforcement mode without extra packages: CartPole, gymnasium-compatible.

Reinforcement mode takes any object with gymnasium's API (`reset(seed=...) -> (obs, info)`,
`step(action) -> (obs, reward, terminated, truncated, info)`, `action_space.n`); this module
ships CartPole so that tests and demos need nothing beyond numpy, and `make_env` builds an
environment from a name: "CartPole" here, anything else through `gymnasium.make`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config.code_references import check_trusted

__all__ = ["CartPole", "Discrete", "OneHotObservations", "checked", "make_env"]

logger = logging.getLogger(__name__)


class Discrete:
    """A discrete action space of `n` actions (the part of gymnasium's a policy needs)."""

    def __init__(self, n: int) -> None:
        self.n = n


class CartPole:
    """The classic cart-pole balancing task (Barto, Sutton and Anderson, 1983).

    The dynamics, thresholds and rewards of gymnasium's CartPole-v1: push the cart left (0)
    or right (1); +1 per step while the pole stays within 12 degrees and the cart within 2.4;
    episodes are truncated at `max_episode_steps` (500).
    """

    gravity, cart_mass, pole_mass, half_length, force, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    angle_limit = 12 * 2 * math.pi / 360
    position_limit = 2.4

    def __init__(self, max_episode_steps: int = 500) -> None:
        self.max_episode_steps = max_episode_steps
        self.action_space = Discrete(2)
        self.observation_shape = (4,)
        self._rng = np.random.default_rng()
        self._state = np.zeros(4)
        self._steps = 0

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._state = self._rng.uniform(-0.05, 0.05, size=4)
        self._steps = 0
        return self._state.astype(np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        x, x_dot, theta, theta_dot = self._state
        force = self.force if int(action) == 1 else -self.force
        total_mass = self.cart_mass + self.pole_mass
        pole_moment = self.pole_mass * self.half_length
        cos, sin = math.cos(theta), math.sin(theta)
        temp = (force + pole_moment * theta_dot**2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.half_length * (4.0 / 3.0 - self.pole_mass * cos**2 / total_mass)
        )
        x_acc = temp - pole_moment * theta_acc * cos / total_mass
        x, x_dot = x + self.tau * x_dot, x_dot + self.tau * x_acc
        theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * theta_acc
        self._state = np.array([x, x_dot, theta, theta_dot])
        self._steps += 1
        terminated = bool(abs(x) > self.position_limit or abs(theta) > self.angle_limit)
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._state.astype(np.float32), 1.0, terminated, truncated, {}


def make_env(name: str) -> Callable[[], Any]:
    """A factory for the environment called `name`: "CartPole" (built in), or a gymnasium
    id ("CartPole-v1" is gymnasium's own when gymnasium is installed).

    Raises:
        ImportError: another name without gymnasium installed (names the package).
    """
    if name == "CartPole":
        return CartPole
    try:
        import gymnasium
    except ImportError as error:
        if name == "CartPole-v1":
            logger.warning(
                "gymnasium is not installed: 'CartPole-v1' is traineval's built-in CartPole "
                "(the same dynamics step for step); pip install gymnasium for gymnasium's"
            )
            return CartPole
        raise ImportError(
            f"environment {name!r} needs gymnasium (pip install gymnasium); the built-in one "
            "is 'CartPole'"
        ) from error
    if ":" in name:  # gymnasium imports the module before the colon
        check_trusted("mode.environment", name)
    else:  # an unknown id: one line naming the setting, before any work
        try:
            gymnasium.spec(name)
        except gymnasium.error.Error as error:
            said = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(
                f"mode.environment={name!r} is invalid: {said} (the built-in one is "
                "'CartPole'; gymnasium's ids look like 'CartPole-v1')"
            ) from None
    return functools.partial(gymnasium.make, name)  # picklable, for worker processes


class OneHotObservations:
    """An environment whose integer observations (a discrete observation space, e.g.
    FrozenLake's cell index) arrive one-hot encoded, as a policy network takes them."""

    def __init__(self, env: Any, n: int) -> None:
        self.env, self.n = env, n
        self.action_space = env.action_space

    def _encode(self, observation: Any) -> np.ndarray:
        encoded = np.zeros(self.n, dtype=np.float32)
        encoded[int(observation)] = 1.0
        return encoded

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        observation, info = self.env.reset(seed=seed, options=options)
        return self._encode(observation), info

    def step(self, action: int) -> Any:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._encode(observation), reward, terminated, truncated, info

    def close(self) -> None:
        getattr(self.env, "close", lambda: None)()


def _one_hot(factory: Callable[[], Any], size: int) -> OneHotObservations:
    return OneHotObservations(factory(), size)


def checked(factory: Callable[[], Any], name: str) -> Callable[[], Any]:
    """`factory`, checked on one environment before any training: an action space it has
    must be discrete (`action_space.n`) or a bounded 1-d Box (continuous actions, a Gaussian
    policy; see `traineval.modes.actions`); integer observations (a discrete observation
    space) are one-hot encoded; Dict and Tuple observation spaces are refused (flatten them).

    Raises:
        ValueError: any other action space, named with the reason.
    """
    from .actions import ActionHead

    env = factory()  # (PolicyGradientStep refuses an object without reset() and step())
    try:  # discrete (a categorical policy) or a bounded 1-d Box (a Gaussian policy)
        ActionHead.of(env)
    except ValueError as error:
        raise ValueError(f"environment {name}: {error}") from None
    observations = getattr(env, "observation_space", None)
    getattr(env, "close", lambda: None)()
    if isinstance(getattr(observations, "spaces", None), (dict, tuple)):  # Dict, Tuple
        raise ValueError(
            f"environment {name}: its observations are a {type(observations).__name__} space "
            f"({observations}), and a policy takes one array per step: flatten them with "
            "gymnasium.wrappers.FlattenObservation (an environment factory such as lambda: "
            "FlattenObservation(gymnasium.make(...)))"
        )
    if isinstance(getattr(observations, "n", None), (int, np.integer)):
        size = int(observations.n)  # type: ignore[union-attr]
        return functools.partial(_one_hot, factory, size)
    return factory
