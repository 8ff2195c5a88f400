"""PPO on gymnasium's CartPole-v1: traineval beside Stable-Baselines3, side by side, one process.

Both run the rl-zoo's tuned CartPole-v1 settings for 100k environment steps: 8 environments,
32 steps each per rollout (256), 20 epochs of one 256-step minibatch, gamma 0.98, GAE lambda
0.8, no entropy bonus, learning rate 1e-3 and clipping range 0.2 both decaying linearly to 0,
gradient norm clipped at 0.5, Adam (eps 1e-5), SB3's MlpPolicy (separate 64-64 tanh bodies
for the policy and the value, orthogonal initialisation). traineval: `TrainingManager.train`
in `mode=Reinforcement(algorithm="ppo")` with the built-in `ActorCritic(separate=True,
orthogonal_init=True)`; 17 rollouts per epoch, 23 epochs: 391 rollouts, SB3's count for
100k steps.

Measured for each seed (the libraries alternate, SB3 first):
- `first >= 475`: the first evaluation point (every 17 rollouts, 4,352 steps) at which the
  greedy policy's mean return over 20 fresh episodes (the same seeds for both libraries) is
  >= 475;
- `final`: the final greedy policy's mean return over 100 fresh episodes;
- `train s`: wall time of training, the time of these evaluations excluded (traineval's own
  per-epoch validation, one greedy episode, and its checkpoint writes stay in).

    .venv/bin/python benchmarks/bench_ppo_cartpole.py [--seeds 0,1,2] [--markdown FILE]

SB3 comes with the `bench` extra (`pip install -c constraints.txt -e .[bench]`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from rl_bench import Act, Curve, sb3_ppo_config
from traineval import TrainingManager
from traineval.callbacks import Callback
from traineval.models import ActorCritic
from traineval.modes import Reinforcement

ENVS, STEPS, ROLLOUTS, PER_EPOCH = 8, 32, 391, 17
EVERY = PER_EPOCH * ENVS * STEPS  # environment steps between evaluations


def greedy_returns(act: Act, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` greedy episodes of CartPole-v1, seeds seed .. seed+episodes-1."""
    import gymnasium

    envs = [gymnasium.make("CartPole-v1") for _ in range(episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns = [0.0] * episodes
    running = list(range(episodes))
    while running:
        actions = act(np.stack([obs[i] for i in running]))
        still = []
        for i, action in zip(running, actions.tolist(), strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(int(action))
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        running = still
    return returns


def torch_act(model: torch.nn.Module) -> Act:
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.as_tensor(obs, dtype=torch.float32))[0]
        return logits.argmax(-1).numpy()

    return act


def run_sb3(seed: int) -> dict[str, object]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    curve = Curve(seed, greedy_returns)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_start(self) -> None:  # the previous rollout is trained on
            if self.num_timesteps and self.num_timesteps % EVERY == 0:
                curve.add(self.num_timesteps, sb3_act(self.model))

    def sb3_act(model: PPO) -> Act:
        def act(obs: np.ndarray) -> np.ndarray:
            return model.predict(obs, deterministic=True)[0]

        return act

    started = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=ENVS, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=STEPS,
        batch_size=256,
        n_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        ent_coef=0.0,
        learning_rate=lambda remaining: 1e-3 * remaining,
        clip_range=lambda remaining: 0.2 * remaining,
        seed=seed,
        device="cpu",
    )
    model.learn(total_timesteps=100_000, callback=Evaluate())  # 391 rollouts
    seconds = time.perf_counter() - started - curve.seconds
    curve.add(model.num_timesteps, sb3_act(model))  # after the last rollout's training
    final = greedy_returns(sb3_act(model), 100, seed=999_000 + seed * 1000)
    return {"curve": curve, "seconds": seconds, "final": float(np.mean(final))}


def run_traineval(seed: int) -> dict[str, object]:
    curve = Curve(seed, greedy_returns)

    class Evaluate(Callback):
        def on_epoch_end(self, control, logs) -> None:
            steps = control.state.global_step // 20 * ENVS * STEPS
            curve.add(steps, torch_act(control.model))

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = ActorCritic(4, 2, hidden_sizes=(64, 64), separate=True, orthogonal_init=True)
    mode = Reinforcement(
        algorithm="ppo",
        envs=ENVS,
        rollout_steps=STEPS,
        minibatch_size=256,
        ppo_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        entropy_coef=0.0,
        clip_decay=True,
        rollouts_per_epoch=PER_EPOCH,
        eval_episodes=1,
        environment="CartPole-v1",
    )
    with tempfile.TemporaryDirectory() as folder:
        config = sb3_ppo_config(folder, seed, ROLLOUTS // PER_EPOCH, "linear")
        TrainingManager(config).train(model, None, mode=mode, callbacks=[Evaluate()])
    seconds = time.perf_counter() - started - curve.seconds
    final = greedy_returns(torch_act(model), 100, seed=999_000 + seed * 1000)
    return {"curve": curve, "seconds": seconds, "final": float(np.mean(final))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for name, run in (("Stable-Baselines3", run_sb3), ("traineval", run_traineval)):
            result = run(seed)
            curve = result["curve"]
            rows.append((name, seed, curve.first_at(475.0), result["final"], result["seconds"]))
            print(
                f"{name:18s} seed {seed}: first >= 475 at {curve.first_at(475.0)} steps, final "
                f"{result['final']:.1f}, train {result['seconds']:.1f} s; curve "
                + " ".join(f"{v:.0f}" for _, v in curve.points),
                flush=True,
            )
    lines = [
        "| library | seed | first >= 475 (env steps) | final return (100 episodes) | train s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s} | {f} | {r:.1f} | {t:.1f} |" for n, s, f, r, t in rows]
    for name in ("Stable-Baselines3", "traineval"):
        mine = [r for r in rows if r[0] == name]
        finals = [r[3] for r in mine]
        lines.append(
            f"| **{name}** | mean | {[r[2] for r in mine]} | {statistics.mean(finals):.1f} | "
            f"{statistics.mean(r[4] for r in mine):.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
