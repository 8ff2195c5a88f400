"""PPO's environments in worker processes, through gymnasium's `AsyncVectorEnv`.

`AsyncEnvBatch` keeps `rollouts.EnvBatch`'s bookkeeping, seeds and state (each
environment's episode seed and the actions since) and hands the stepping to
`gymnasium.vector.AsyncVectorEnv`: one worker process per environment, all stepped at
once, which pays where an environment step costs more than a process round trip
(simulators, emulators, anything that renders). The vector environment runs with autoreset
disabled: traineval resets an environment whose episode ended itself, with the next seed
from the run's generator, so a run's episodes are the ones an in-process run plays and a
checkpoint of either resumes in the other.

Restoring a checkpoint resets each worker's environment with its episode's seed and
replays the episode's actions there (`ReplayingEnv`), all workers at once.

The environment factory goes to the workers by pickling where processes are not forked
(macOS and Windows, or Python's default from 3.14): there it must be a module-level
function or a `functools.partial` of one (environment names are).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import gymnasium
import numpy as np

from .rollouts import EnvBatch, Reached

__all__ = ["AsyncEnvBatch", "ReplayingEnv"]


class ReplayingEnv(gymnasium.Env):
    """One environment of an `AsyncEnvBatch`, in its worker process: the user's environment
    with gymnasium spaces (the batch's), which after a reset replays `replay` (a restored
    episode's actions) when set, keeping their return in `replayed_return`."""

    def __init__(
        self, factory: Callable[[], Any] | None, observation_space: Any, action_space: Any
    ) -> None:
        self.env: Any = factory() if factory is not None else None  # None: spaces only
        self.observation_space, self.action_space = observation_space, action_space
        self.replay: list[Any] | None = None
        self.replayed_return = 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        observation = self.env.reset(seed=seed)[0]
        actions, self.replay = self.replay or [], None
        self.replayed_return = 0.0
        for action in actions:
            observation, reward, *_ = self.env.step(action)
            self.replayed_return += float(reward)
        return observation, {}

    def step(self, action: Any) -> Any:
        observation, reward, terminated, truncated, _ = self.env.step(_plain(action))
        return observation, reward, terminated, truncated, {}

    def close(self) -> None:
        if self.env is not None:
            getattr(self.env, "close", lambda: None)()


def worker_env(
    factory: Callable[[], Any], observation_space: Any, action_space: Any, training_pid: int
) -> ReplayingEnv:
    """A worker's environment. Ctrl-C reaches every process of the terminal's group, and a
    scheduler's SIGTERM may too: a worker ignores both (neither dying under the rollout nor
    running a handler forked from the training process), and the training process stops at
    its next step boundary and closes the workers. (AsyncVectorEnv also makes one in the
    training process, to read its spaces: that one holds the spaces only, so a costly
    environment is not started there once more, and leaves the signals alone.)"""
    if os.getpid() == training_pid:
        return ReplayingEnv(None, observation_space, action_space)
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _end_with_the_training_process(training_pid)
    return ReplayingEnv(factory, observation_space, action_space)


def _end_with_the_training_process(training_pid: int) -> None:
    """Linux: the kernel ends this worker when the process that started it dies (a kill -9
    of the run), rather than the worker writing to the dead pipe and printing gymnasium's
    BrokenPipe traceback over the terminal. Elsewhere the pipe's error ends it. (The kernel
    ties the signal to the thread that started the worker: the run's training thread, which
    closes its workers before it ends.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the pipe's error ends the worker
        return
    if os.getppid() == 1 and training_pid != 1:  # it died before the line above
        os._exit(0)


def _plain(action: Any) -> Any:
    """A discrete action as the Python int an in-process run passes (numpy's int64 from the
    batched array otherwise); continuous actions stay float32 rows."""
    return int(action) if np.ndim(action) == 0 else action


class _Spaces:
    def __init__(self, observation_space: Any, action_space: Any) -> None:
        self.observation_space, self.action_space = observation_space, action_space


def gymnasium_spaces(factory: Callable[[], Any]) -> _Spaces:
    """The environment's spaces as gymnasium's (which AsyncVectorEnv batches), from one
    environment made here: its own where they are gymnasium spaces, else a float Box of its
    observations' shape and a Discrete of its `action_space.n` (traineval's built-in and
    one-hot environments)."""
    env = factory()
    try:
        observations, actions = getattr(env, "observation_space", None), env.action_space
        if not isinstance(observations, gymnasium.spaces.Space):
            shape = np.asarray(env.reset(seed=0)[0]).shape
            observations = gymnasium.spaces.Box(-np.inf, np.inf, shape, np.float32)
        if not isinstance(actions, gymnasium.spaces.Space):
            actions = gymnasium.spaces.Discrete(int(actions.n))
        return _Spaces(observations, actions)
    finally:
        getattr(env, "close", lambda: None)()


def check_picklable(factory: Callable[[], Any]) -> None:
    """Where workers are not forked, the factory travels to them pickled: refuse one that
    cannot, naming it and what works, before any process starts."""
    if multiprocessing.get_start_method(allow_none=False) == "fork":
        return
    try:
        pickle.dumps(factory)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        name = getattr(factory, "__qualname__", None) or repr(factory)
        raise ValueError(
            f"mode.vectorization='async' sends the environment factory {name} to worker "
            f"processes ({multiprocessing.get_start_method()} start method), which needs it "
            "picklable: a module-level function, a class, or functools.partial of one (an "
            f"environment name works); it is not ({error})"
        ) from None


class AsyncEnvBatch(EnvBatch):
    """`n` environments from `factory`, each in a worker process (gymnasium's
    AsyncVectorEnv, started at the first rollout); see the module docstring. `spaces`: those
    of another batch of the same environments (else one environment is made to read them)."""

    def __init__(
        self,
        factory: Callable[[], Any],
        n: int,
        max_episode_steps: int,
        spaces: _Spaces | None = None,
    ) -> None:
        if not hasattr(gymnasium.vector, "AutoresetMode"):
            raise ImportError(
                "mode.vectorization='async' needs gymnasium>=1.1 (its AsyncVectorEnv resets "
                f"one environment at a time from 1.1 on); this is {gymnasium.__version__}: "
                "pip install -U gymnasium"
            )
        check_picklable(factory)
        self.factory = factory
        self._spaces = spaces if spaces is not None else gymnasium_spaces(factory)
        self.vector: Any = None
        self.envs = []
        self._track(n, max_episode_steps)

    @property
    def spaces(self) -> Any:
        return self._spaces

    def _workers(self) -> Any:
        if self.vector is None:
            spaces = (self._spaces.observation_space, self._spaces.action_space)
            make = partial(worker_env, self.factory, *spaces, os.getpid())
            self.vector = gymnasium.vector.AsyncVectorEnv(
                [make] * len(self),
                autoreset_mode=gymnasium.vector.AutoresetMode.DISABLED,
            )
        return self.vector

    def _step_all(self, actions: list[Any]) -> list[tuple[Any, float, bool, bool]]:
        observations, rewards, terminated, truncated, _ = self._workers().step(np.asarray(actions))
        return list(zip(observations, rewards, terminated, truncated, strict=True))

    def _reset_some(self, seeds: dict[int, int], replays: Mapping[int, list[Any]]) -> Reached:
        vector, n = self._workers(), len(self)
        mask = np.zeros(n, dtype=bool)
        mask[list(seeds)] = True
        if replays:
            vector.set_attr("replay", [replays.get(i) for i in range(n)])
        observations, _ = vector.reset(
            seed=[seeds.get(i) for i in range(n)], options={"reset_mask": mask}
        )
        returns = vector.get_attr("replayed_return") if replays else [0.0] * n
        return {i: (np.array(observations[i]), float(returns[i])) for i in seeds}

    def close(self) -> None:
        if self.vector is not None:
            self.vector.close()
            self.vector = None
