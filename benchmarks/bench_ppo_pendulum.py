"""PPO with continuous actions on gymnasium's Pendulum-v1: traineval beside Stable-Baselines3.

Both run the rl-zoo's Pendulum-v1 PPO settings, by default without its gSDE exploration and
normalisation (the flags below add them), for 100k environment steps: 4
environments, 1,024 steps each per rollout, 10 epochs of minibatches of 64, gamma 0.9, GAE
lambda 0.95, no entropy bonus, Adam at 1e-3 (constant), clipping range 0.2, gradient norm
clipped at 0.5, SB3's MlpPolicy (separate 64-64 tanh bodies, orthogonal initialisation, a
Gaussian with one learned log standard deviation per action dimension, starting at 0).
traineval: `mode=Reinforcement(algorithm="ppo")` with the built-in
`ActorCritic(gaussian=True, separate=True, orthogonal_init=True)`; 25 rollouts, SB3's count.

Measured per seed (SB3 first): the greedy policy's mean return over 20 fresh episodes after
every 5 rollouts (the same episode seeds for both), the final one over 100 fresh episodes,
and the training wall time with those evaluations excluded.

`--normalize` adds the rl-zoo's observation and reward normalisation on both sides (SB3's
`VecNormalize`, whose observation statistics its greedy evaluation uses too; traineval's
`ActorCritic(normalize_observations=True)` and `normalize_rewards=True`). `--sde` adds the
rl-zoo's gSDE exploration on both sides, new noise every 4 steps (SB3's `use_sde=True,
sde_sample_freq=4`; traineval's `ActorCritic(sde=True)` and `sde_sample_freq=4`); with both
flags, the rl-zoo's settings whole.

    .venv/bin/python benchmarks/bench_ppo_pendulum.py [--seeds 0,1,2] [--normalize] [--sde]
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
from traineval.training.batches import prediction_of

ENVS, STEPS, ROLLOUTS, PER_EPOCH = 4, 1024, 25, 5
EVERY = PER_EPOCH * ENVS * STEPS


def greedy_returns(act: Act, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` greedy Pendulum-v1 episodes (200 steps), seeds seed, seed+1, ..."""
    import gymnasium

    envs = [gymnasium.make("Pendulum-v1") for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros(episodes)
    for _ in range(200):
        actions = np.clip(act(obs), -2.0, 2.0)
        stepped = [env.step(a) for env, a in zip(envs, actions, strict=True)]
        obs = np.stack([s[0] for s in stepped])
        returns += [s[1] for s in stepped]
    return returns.tolist()


def torch_act(model: torch.nn.Module) -> Act:
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = prediction_of(model(torch.as_tensor(obs, dtype=torch.float32)))
        return out[:, :1].numpy()  # the means

    return act


def run_sb3(seed: int, normalize: bool, sde: bool) -> dict[str, object]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    curve = Curve(seed, greedy_returns)

    def sb3_act(model: PPO) -> Act:
        def act(obs: np.ndarray) -> np.ndarray:
            if normalize:  # the policy sees observations as VecNormalize scales them
                obs = model.get_env().normalize_obs(obs)
            return model.predict(obs, deterministic=True)[0]

        return act

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_start(self) -> None:
            if self.num_timesteps and self.num_timesteps % EVERY == 0:
                curve.add(self.num_timesteps, sb3_act(self.model))

    started = time.perf_counter()
    env = make_vec_env("Pendulum-v1", n_envs=ENVS, seed=seed)
    if normalize:
        from stable_baselines3.common.vec_env import VecNormalize

        env = VecNormalize(env, gamma=0.9)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=STEPS,
        batch_size=64,
        n_epochs=10,
        gamma=0.9,
        gae_lambda=0.95,
        ent_coef=0.0,
        learning_rate=1e-3,
        clip_range=0.2,
        use_sde=sde,
        sde_sample_freq=4 if sde else -1,
        seed=seed,
        device="cpu",
    )
    model.learn(total_timesteps=ROLLOUTS * ENVS * STEPS, callback=Evaluate())
    seconds = time.perf_counter() - started - curve.seconds
    curve.add(model.num_timesteps, sb3_act(model))
    final = greedy_returns(sb3_act(model), 100, seed=999_000 + seed * 1000)
    return {"curve": curve, "seconds": seconds, "final": float(np.mean(final))}


def run_traineval(seed: int, normalize: bool, sde: bool) -> dict[str, object]:
    curve = Curve(seed, greedy_returns)

    class Evaluate(Callback):
        def on_epoch_end(self, control, logs) -> None:
            steps = control.state.global_step // 640 * ENVS * STEPS
            curve.add(steps, torch_act(control.model))

    started = time.perf_counter()
    torch.manual_seed(seed)
    model = ActorCritic(
        3, 2, hidden_sizes=(64, 64), separate=True, orthogonal_init=True, gaussian=True,
        normalize_observations=normalize, sde=sde,
    )  # fmt: skip
    mode = Reinforcement(
        algorithm="ppo",
        envs=ENVS,
        rollout_steps=STEPS,
        minibatch_size=64,
        ppo_epochs=10,
        gamma=0.9,
        gae_lambda=0.95,
        entropy_coef=0.0,
        rollouts_per_epoch=PER_EPOCH,
        eval_episodes=1,
        max_episode_steps=200,
        environment="Pendulum-v1",
        normalize_rewards=normalize,
        sde_sample_freq=4 if sde else -1,
    )
    with tempfile.TemporaryDirectory() as folder:
        config = sb3_ppo_config(folder, seed, ROLLOUTS // PER_EPOCH, "constant")
        TrainingManager(config).train(model, None, mode=mode, callbacks=[Evaluate()])
    seconds = time.perf_counter() - started - curve.seconds
    final = greedy_returns(torch_act(model), 100, seed=999_000 + seed * 1000)
    return {"curve": curve, "seconds": seconds, "final": float(np.mean(final))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--normalize", action="store_true", help="observations and rewards")
    parser.add_argument("--sde", action="store_true", help="gSDE exploration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, run in (("Stable-Baselines3", run_sb3), ("traineval", run_traineval)):
            result = run(seed, args.normalize, args.sde)
            curve = result["curve"]
            points = " ".join(f"{v:.0f}" for _, v in curve.points)
            rows.append((name, seed, points, result["final"], result["seconds"]))
            print(
                f"{name:18s} seed {seed}: final {result['final']:.1f}, train "
                f"{result['seconds']:.1f} s; curve {points}",
                flush=True,
            )
    lines = [
        "| library | seed | return every 20,480 steps (20 episodes) | final (100) | train s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s} | {c} | {f:.1f} | {t:.1f} |" for n, s, c, f, t in rows]
    for name in ("Stable-Baselines3", "traineval"):
        mine = [r for r in rows if r[0] == name]
        finals = [r[3] for r in mine]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(
            f"| **{name}** | mean | | {statistics.mean(finals):.1f} ± {spread:.1f} | "
            f"{statistics.mean(r[4] for r in mine):.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
