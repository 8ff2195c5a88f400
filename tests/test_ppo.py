"""PPO in reinforcement mode against a hand-written PPO loop; GAE, resume, normalisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from test_reinforcement import ActorCritic, Walk
from traineval import TrainingManager
from traineval.loggers import read_jsonl
from traineval.models import ActorCritic as BuiltinActorCritic
from traineval.models import RunningNorm
from traineval.modes import Reinforcement
from traineval.modes.rollouts import gae
from traineval.runs.resume import check_mode
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, plain_sgd_config

# 3 walks x 4 steps per rollout, minibatches of 5 (5, 5, 2), 2 passes: 6 updates per rollout;
# the walks end (+-3, 6 steps) and are cut (max_episode_steps 5) inside rollouts
PPO = Reinforcement(
    algorithm="ppo",
    envs=3,
    rollout_steps=4,
    minibatch_size=5,
    ppo_epochs=2,
    rollouts_per_epoch=1,
    gamma=0.9,
    gae_lambda=0.8,
    clip_range=0.1,
    value_clip=0.2,
    max_episode_steps=5,
    eval_episodes=2,
)


def _config(quiet_config, **overrides):
    settings = {"num_epochs": 2, "learning_rate": 0.1, "early_stopping_patience": 0}
    return plain_sgd_config(quiet_config, **{**settings, **overrides})


def _gae_by_sums(rewards, values, dones, last_values, gamma, lam):
    """Advantages as sums of discounted TD errors up to each episode's end (no recursion)."""
    steps, envs = rewards.shape
    nxt = np.vstack([values[1:], last_values[None]])
    delta = rewards + gamma * nxt * (1 - dones) - values
    advantages = np.zeros_like(rewards)
    for n in range(envs):
        for t in range(steps):
            total, factor = 0.0, 1.0
            for k in range(t, steps):
                total += factor * delta[k, n]
                if dones[k, n]:
                    break
                factor *= gamma * lam
            advantages[t, n] = total
    return advantages


def test_gae_equals_the_sum_of_discounted_td_errors():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    dones = rng.random((7, 3)) < 0.3
    last = rng.normal(size=3)
    advantages, returns = gae(
        *(torch.as_tensor(a, dtype=torch.float64) for a in (rewards, values, dones, last)),
        gamma=0.9,
        lam=0.7,
    )
    expected = _gae_by_sums(rewards, values, dones.astype(float), last, 0.9, 0.7)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(returns.numpy(), expected + values, rtol=1e-12)


def _policy(model, obs):
    logits, value = model(torch.as_tensor(np.asarray(obs), dtype=torch.float32))
    return logits, value.reshape(-1)


def _collect(model, envs, state, steps, gamma, max_steps):
    """One rollout, in the draw order of the step: seeds in env order, one batched sample
    per step, a new seed as each episode ends (cut at `max_steps`)."""

    def reset(i):
        state["obs"][i] = envs[i].reset(seed=int(torch.randint(2**31 - 1, ()).item()))[0]
        state["length"][i] = 0

    if not state:
        state.update(obs=[None] * len(envs), length=[0] * len(envs))
        for i in range(len(envs)):
            reset(i)
    cols = {k: [] for k in ("obs", "act", "logp", "val", "rew", "done")}
    with torch.no_grad():
        for _ in range(steps):
            logits, values = _policy(model, np.stack(state["obs"]))
            logp = logits.log_softmax(-1)
            actions = torch.multinomial(logp.exp(), 1).squeeze(1)
            cols["obs"].append(np.stack(state["obs"]))
            rewards, dones = np.zeros(len(envs)), np.zeros(len(envs))
            for i, a in enumerate(actions.tolist()):
                obs, r, term, trunc, _ = envs[i].step(a)
                state["length"][i] += 1
                rewards[i] = r
                cut = (trunc or state["length"][i] >= max_steps) and not term
                if cut:
                    rewards[i] += gamma * float(_policy(model, obs[None])[1][0])
                state["obs"][i] = obs
                if term or cut:
                    dones[i] = 1
                    reset(i)
            cols["act"].append(actions)
            cols["logp"].append(logp.gather(1, actions[:, None]).squeeze(1))
            cols["val"].append(values)
            cols["rew"].append(rewards)
            cols["done"].append(dones)
        last = _policy(model, np.stack(state["obs"]))[1]
    return cols, last


def _reference(model, rollouts, mode, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    envs = [Walk() for _ in range(mode.envs)]
    state: dict = {}
    for _ in range(rollouts):
        cols, last = _collect(
            model, envs, state, mode.rollout_steps, mode.gamma, mode.max_episode_steps
        )
        values = torch.stack(cols["val"]).double()
        rewards = torch.tensor(np.array(cols["rew"]))
        dones = np.array(cols["done"])
        adv = torch.tensor(
            _gae_by_sums(
                rewards.numpy(), values.numpy(), dones, last.double().numpy(), mode.gamma, 0.8
            )
        )
        ret = (adv + values).float().flatten()
        adv = adv.float().flatten()
        obs = torch.tensor(np.array(cols["obs"])).flatten(0, 1)
        act, old_logp = torch.stack(cols["act"]).flatten(), torch.stack(cols["logp"]).flatten()
        old_val = values.float().flatten()
        size = len(act)
        orders = [torch.randperm(size) for _ in range(mode.ppo_epochs)]
        for order in orders:
            for start in range(0, size, mode.minibatch_size):
                rows = order[start : start + mode.minibatch_size]
                logits, v = _policy(model, obs[rows])
                logp = logits.log_softmax(-1)
                new = logp.gather(1, act[rows][:, None]).squeeze(1)
                entropy = -(logp.exp() * logp).sum(-1).mean()
                a = adv[rows]
                a = (a - a.mean()) / (a.std() + 1e-8)
                ratio = (new - old_logp[rows]).exp()
                clipped = ratio.clamp(1 - mode.clip_range, 1 + mode.clip_range)
                policy_loss = -torch.min(ratio * a, clipped * a).mean()
                v = old_val[rows] + (v - old_val[rows]).clamp(-0.2, 0.2)
                value_loss = ((v - ret[rows]) ** 2).mean()
                loss = policy_loss + 0.5 * value_loss - mode.entropy_coef * entropy
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()


def test_ppo_equals_a_hand_written_ppo_loop(quiet_config):
    ours, theirs = ActorCritic(), ActorCritic()
    config = _config(quiet_config)
    torch.manual_seed(config.seed)  # the run seeds the global generator with config.seed
    result = TrainingManager(config).train(ours, Walk, mode=PPO)
    torch.manual_seed(config.seed)
    _reference(theirs, 2, PPO, lr=0.1)
    assert result["global_step"] == 12  # 2 epochs x 1 rollout x 2 passes x 3 minibatches
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_ppo_run_interrupted_inside_a_rollout_resumes_exactly(quiet_config, tmp_path):
    settings = {"num_epochs": 3, "optimizer_type": "adamw", "eval_frequency": 4, "log_frequency": 6}
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = ActorCritic()
    first = TrainingManager(_config(quiet_config, **settings)).train(straight, Walk, mode=PPO)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # update 8 of 18: inside the second rollout
        TrainingManager(_config(quiet_config, **settings)).train(
            ActorCritic(), Walk, mode=PPO, callbacks=[InterruptAt(8)]
        )
    resumed = ActorCritic()
    result = TrainingManager(_config(quiet_config, **settings)).train(
        resumed, Walk, mode=PPO, resume_from="auto"
    )
    assert result["global_step"] == 18
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert result["training_history"]["val_metrics"] == first["training_history"]["val_metrics"]
    logged = [
        r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if r.get("event") == "train"
    ]
    assert {"train_clip_fraction", "train_approx_kl", "train_value_loss"} <= set(logged[-1])


def test_ppo_learns_cartpole(quiet_config):
    torch.manual_seed(0)
    policy = BuiltinActorCritic(4, 2, (64, 64), separate=True, orthogonal_init=True)
    mode = Reinforcement(
        envs=8,
        rollout_steps=32,
        ppo_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        entropy_coef=0.0,
        rollouts_per_epoch=12,
        eval_episodes=5,
        environment="CartPole",
    )
    config = _config(
        quiet_config,
        num_epochs=8,  # 96 rollouts, 24,576 steps (at 4, a plateau near 130 on some CPUs)
        optimizer_type="adam",
        learning_rate=1e-3,
        adam_epsilon=1e-5,
        gradient_clipping=True,
        max_grad_norm=0.5,
    )
    result = TrainingManager(config).train(policy, None, mode=mode)
    returns = [m["return"] for m in result["training_history"]["val_metrics"]]
    assert max(returns) >= 200  # a random policy lasts about 20 steps


def test_observation_statistics_follow_the_played_observations(quiet_config):
    torch.manual_seed(0)
    policy = BuiltinActorCritic(2, 2, (8,), normalize_observations=True)
    step = PPO.step(Walk)
    out = step(policy, 0)
    seen = step.rollout["observations"]  # raw observations, as played
    norm = policy.normalize
    torch.testing.assert_close(norm.mean.float(), seen.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.var.float(), seen.var(0, unbiased=False), rtol=1e-3, atol=1e-4)
    # the old log-probabilities are recomputed with the final statistics: ratio 1 at first
    assert float(out.metrics["approx_kl"]) == 0.0
    assert float(out.metrics["clip_fraction"]) == 0.0
    # forward passes never move the statistics
    before = norm.mean.clone()
    policy(torch.randn(4, 2) * 10)
    assert torch.equal(norm.mean, before)


def test_running_norm_merges_batches_like_one():
    x = torch.randn(100, 3) * 4 + 2
    one, two = RunningNorm(3), RunningNorm(3)
    one.update_statistics(x)
    two.update_statistics(x[:30])
    two.update_statistics(x[30:])
    torch.testing.assert_close(one.mean, two.mean)
    torch.testing.assert_close(one.var, two.var)
    torch.testing.assert_close(one.mean.float(), x.mean(0), rtol=1e-4, atol=1e-4)


def test_ppo_settings_and_errors_are_clear(quiet_config):
    assert Reinforcement().algorithm == "ppo"
    assert Reinforcement(updates_per_epoch=3).algorithm == "policy_gradient"
    with pytest.raises(ValueError, match=r"reinforcement\.updates_per_epoch=3 is invalid: a "):
        Reinforcement(algorithm="ppo", updates_per_epoch=3)
    with pytest.raises(ValueError, match=r"reinforcement\.envs=2 is invalid: a setting of"):
        Reinforcement(algorithm="policy_gradient", envs=2)
    with pytest.raises(ValueError, match=r"reinforcement\.algorithm='ppo2' is invalid"):
        Reinforcement(algorithm="ppo2")
    with pytest.raises(ValueError, match=r"gae_lambda=1\.5 is invalid"):
        Reinforcement(gae_lambda=1.5)
    # a record written before PPO (every setting of the day, no algorithm) is policy gradient
    old = {
        f: getattr(Reinforcement(algorithm="policy_gradient"), f)
        for f in ("episodes_per_update", "updates_per_epoch", "gamma", "value_coef")
    }
    assert Reinforcement.from_settings(old).algorithm == "policy_gradient"
    with pytest.raises(
        ValueError, match=r"trained in mode='policy_gradient', this run is mode='ppo'"
    ):
        check_mode({"mode": {"name": "reinforcement", **old}}, Reinforcement())
    check_mode({"mode": {"name": "reinforcement", **old}}, Reinforcement(**old))  # the same
    no_value = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"algorithm='ppo' needs a value head"):
        TrainingManager(_config(quiet_config)).train(no_value, Walk, mode=PPO)


def test_ppo_from_a_config_file(tmp_path):
    from traineval.cli import main

    config = tmp_path / "ppo.yaml"
    config.write_text(
        "mode: {name: reinforcement, algorithm: ppo, environment: CartPole, envs: 4, "
        "rollout_steps: 16, minibatch_size: 32, ppo_epochs: 2, rollouts_per_epoch: 2, "
        "eval_episodes: 2}\n"
        "model: {name: actor_critic, options: {separate: true, orthogonal_init: true, "
        "normalize_observations: true}}\n"
        "training: {num_epochs: 2, learning_rate: 1.0e-3, warmup_steps: 0, "
        "scheduler_type: linear, tensorboard_logging: false}\n"
    )
    assert main(["fit", str(config), "-q", f"training.output_dir={tmp_path / 'run'}"]) == 0
    record = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"return", "episode_length"}
    assert main(["evaluate", str(tmp_path / "run")]) == 0  # the model carries its statistics
    again = json.loads((tmp_path / "run" / "evaluation" / "metrics_test.json").read_text())
    assert again["metrics"] == record["test"]
    mode = dataclasses.replace(PPO)
    assert mode.to_dict()["name"] == "ppo"
    assert Path(tmp_path / "run" / "checkpoints").is_dir()


def _reward_scale_by_hand(rewards, dones, gamma, clip=10.0):
    """SB3's VecNormalize(norm_reward=True) written out: a running mean / variance of the
    discounted returns (Chan et al.'s parallel update, count starting at 1e-4), rewards
    divided by sqrt(var + 1e-8) and clipped."""
    mean, var, count = 0.0, 1.0, 1e-4
    returns = np.zeros(rewards.shape[1])
    out = []
    for r, d in zip(rewards, dones, strict=True):
        returns = returns * gamma + r
        batch_mean, batch_var, n = returns.mean(), returns.var(), len(returns)
        delta, total = batch_mean - mean, count + n
        var = (var * count + batch_var * n + delta**2 * count * n / total) / total
        mean, count = mean + delta * n / total, total
        out.append(np.clip(r / np.sqrt(var + 1e-8), -clip, clip))
        returns[d] = 0.0
    return np.array(out)


def test_reward_normalisation_equals_sb3s_rule_and_resumes_exactly(quiet_config, tmp_path):
    from traineval.modes.ppo import RewardScale
    from traineval.system.distributed import Distributed

    rng = np.random.default_rng(0)
    rewards = rng.normal(1.0, 3.0, size=(40, 3))
    dones = rng.random((40, 3)) < 0.1
    scale = RewardScale(3, 0.9, Distributed())
    ours = np.array([scale(r, d) for r, d in zip(rewards, dones, strict=True)])
    np.testing.assert_allclose(ours, _reward_scale_by_hand(rewards, dones, 0.9), rtol=1e-12)
    assert abs(ours).max() < abs(rewards).max()  # scaled down: returns vary more than rewards

    mode = dataclasses.replace(PPO, normalize_rewards=True)
    settings = {"num_epochs": 3, "optimizer_type": "adamw"}
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = ActorCritic()
    TrainingManager(_config(quiet_config, **settings)).train(straight, Walk, mode=mode)
    plain = ActorCritic()
    quiet_config["output_dir"] = str(tmp_path / "plain")
    TrainingManager(_config(quiet_config, **settings)).train(plain, Walk, mode=PPO)
    assert not torch.equal(plain.pi.weight, straight.pi.weight)  # the scaling changed training
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # inside the second rollout
        TrainingManager(_config(quiet_config, **settings)).train(
            ActorCritic(), Walk, mode=mode, callbacks=[InterruptAt(8)]
        )
    resumed = ActorCritic()
    TrainingManager(_config(quiet_config, **settings)).train(
        resumed, Walk, mode=mode, resume_from="auto"
    )
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"normalize_rewards=True is invalid: a setting of"):
        Reinforcement(algorithm="policy_gradient", normalize_rewards=True)


# a PPO run's mode record before PPO and policy gradient were two modes: both algorithms'
# settings, policy gradient's at their defaults
RECORD_BEFORE_THE_SPLIT = {
    "name": "reinforcement",
    "algorithm": "ppo",
    "envs": 4,
    "rollout_steps": 16,
    "minibatch_size": 32,
    "ppo_epochs": 2,
    "clip_range": 0.2,
    "clip_decay": False,
    "value_clip": None,
    "gae_lambda": 0.95,
    "rollouts_per_epoch": 2,
    "episodes_per_update": 8,
    "updates_per_epoch": 10,
    "gamma": 0.99,
    "value_coef": 0.5,
    "entropy_coef": 0.01,
    "normalize_advantages": True,
    "max_episode_steps": 1000,
    "eval_episodes": 2,
    "environment": "CartPole",
    "normalize_rewards": False,
    "vectorization": "sync",
    "sde_sample_freq": -1,
}


def test_ppo_and_policy_gradient_are_two_modes_with_their_own_settings():
    from traineval.config import TrainingMode
    from traineval.modes import PPO, PolicyGradient, mode_class, resolve_mode
    from traineval.modes.episodic import Episodic

    assert mode_class("ppo") is PPO
    assert mode_class("policy_gradient") is PolicyGradient
    assert type(resolve_mode(TrainingMode.REINFORCEMENT)) is PPO  # the specification's name
    assert type(resolve_mode("reinforcement")) is PPO
    shared = {f.name for f in dataclasses.fields(Episodic)}
    assert len(shared) == 7
    assert {f.name for f in dataclasses.fields(PolicyGradient)} - shared == {
        "episodes_per_update",
        "updates_per_epoch",
    }
    assert len(dataclasses.fields(PPO)) == 19
    assert PPO(envs=4).to_dict()["name"] == "ppo"
    assert "episodes_per_update" not in PPO().to_dict()
    with pytest.raises(ValueError, match=r"mode\.episodes_per_update=4 is invalid: mode 'ppo' "):
        PPO.from_settings({"episodes_per_update": 4})
    with pytest.raises(ValueError, match=r"ppo\.value_clip=0 is invalid: expected a finite num"):
        PPO(value_clip=0)
    with pytest.raises(ValueError, match=r"ppo\.sde_sample_freq=0 is invalid: expected -1"):
        PPO(sde_sample_freq=0)


def test_a_record_written_before_the_split_loads_and_resumes_as_ppo():
    from traineval.modes import PPO, mode_class

    settings = {k: v for k, v in RECORD_BEFORE_THE_SPLIT.items() if k != "name"}
    mode = mode_class("reinforcement").from_settings(settings)
    assert mode == PPO(envs=4, rollout_steps=16, minibatch_size=32, ppo_epochs=2,
                       rollouts_per_epoch=2, eval_episodes=2, environment="CartPole")  # fmt: skip
    check_mode({"mode": RECORD_BEFORE_THE_SPLIT}, mode)  # the same run: resumes
    with pytest.raises(ValueError, match=r"ppo\.envs: checkpoint 4, now 8"):
        check_mode({"mode": RECORD_BEFORE_THE_SPLIT}, dataclasses.replace(mode, envs=8))
    with pytest.raises(ValueError, match=r"trained in mode='ppo', this run is mode='policy_grad"):
        check_mode({"mode": RECORD_BEFORE_THE_SPLIT}, Reinforcement(episodes_per_update=8))


def test_settings_and_records_under_reinforcement_reach_the_algorithm():
    from traineval import TrainingConfig
    from traineval.modes import PPO, PolicyGradient, resolve_mode

    config = TrainingConfig(mode_settings={"reinforcement": {"algorithm": "ppo", "gamma": 0.9}})
    assert config.mode_settings == {"reinforcement": {"algorithm": "ppo", "gamma": 0.9}}
    assert resolve_mode("reinforcement", config) == PPO(gamma=0.9)
    assert resolve_mode("ppo", config) == PPO(gamma=0.9)  # the legacy rl_* keys land there
    with pytest.raises(ValueError, match="disagree"):
        resolve_mode(PPO(), config)
    # a checkpoint of before modes recorded themselves: flat keys of policy gradient
    old = {"config": {"rl_episodes_per_update": 3, "rl_gamma": 0.9}}
    check_mode(old, PolicyGradient(episodes_per_update=3, gamma=0.9))
    with pytest.raises(ValueError, match=r"mode='policy_gradient', this run is mode='ppo'"):
        check_mode(old, PPO(gamma=0.9))


def test_a_minibatch_larger_than_the_rollout_is_said(caplog):
    """minibatch_size=1000 over 32-sample rollouts was cut to the rollout without a word;
    the default (256) over a small rollout stays quiet."""
    from traineval.modes.ppo import PPO, PPOStep

    with caplog.at_level("WARNING", logger="traineval"):
        PPOStep(Walk, PPO(envs=2, rollout_steps=16, minibatch_size=1000))
    assert "ppo minibatch_size=1000 is more than a rollout holds (envs 2 x rollout_steps 16" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="traineval"):
        PPOStep(Walk, PPO(envs=2, rollout_steps=16))
    assert "minibatch_size" not in caplog.text
