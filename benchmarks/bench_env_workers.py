"""PPO's environments in this process (vectorization='sync') or in worker processes
('async', gymnasium's AsyncVectorEnv), side by side, for environments of growing step cost.

Each run trains traineval's PPO on CartPole-v1 whose step is made to cost `--cost-ms` more:
spent computing (`cpu`: a numpy loop, as a physics simulator) or waiting (`wait`: a sleep, as
an environment behind a socket or a GPU renderer). 8 environments, 64 steps per rollout, 8
rollouts (4,096 environment steps), 4 passes of 256-step minibatches each; the same weights
come out of both (tests/test_env_workers.py). Reported: training wall time, median of the
repeats (variants alternate within each repeat), and sync / async.

    .venv/bin/python benchmarks/bench_env_workers.py [--costs 0,1] [--kinds cpu,wait] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import numpy as np
import torch

from traineval import TrainingConfig, TrainingManager
from traineval.models import ActorCritic
from traineval.modes import Reinforcement


class CostlyCartPole:
    """gymnasium's CartPole-v1 whose step costs `cost_ms` more, computing or waiting."""

    def __init__(self, cost_ms: float, kind: str) -> None:
        import gymnasium

        self.env = gymnasium.make("CartPole-v1")
        self.action_space = self.env.action_space
        self.observation_space = self.env.observation_space
        self.cost, self.kind = cost_ms / 1000, kind

    def reset(self, seed=None, options=None):
        return self.env.reset(seed=seed)

    def step(self, action):
        if self.kind == "wait":
            time.sleep(self.cost)
        else:
            until = time.perf_counter() + self.cost
            x = np.ones(64)
            while time.perf_counter() < until:
                x = np.sqrt(x * 1.0001)
        return self.env.step(action)

    def close(self):
        self.env.close()


def train(cost_ms: float, kind: str, vectorization: str) -> float:
    torch.manual_seed(0)
    model = ActorCritic(4, 2, hidden_sizes=(64, 64), separate=True)
    mode = Reinforcement(envs=8, rollout_steps=64, minibatch_size=256, ppo_epochs=4,
                         rollouts_per_epoch=4, eval_episodes=1,
                         vectorization=vectorization)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(num_epochs=2, seed=0, output_dir=folder, progress_bar=False,
                                tensorboard_logging=False, warmup_steps=0,
                                log_frequency=1000)  # fmt: skip
        started = time.perf_counter()
        TrainingManager(config).train(
            model, functools.partial(CostlyCartPole, cost_ms, kind), mode=mode
        )
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", default="0,0.2,1")
    parser.add_argument("--kinds", default="cpu,wait")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| step cost | kind | sync s | async s | sync / async |\n|---|---|---|---|---|")
    for cost in [float(c) for c in args.costs.split(",")]:
        for kind in args.kinds.split(",") if cost else ["none"]:
            times: dict[str, list[float]] = {"sync": [], "async": []}
            for _ in range(args.repeats):
                for vectorization in times:
                    times[vectorization].append(train(cost, kind, vectorization))
            sync, workers = (statistics.median(times[v]) for v in ("sync", "async"))
            print(f"| {cost:g} ms | {kind} | {sync:.2f} | {workers:.2f} | {sync / workers:.2f}x |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
