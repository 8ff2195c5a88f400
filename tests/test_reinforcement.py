"""Reinforcement mode (policy gradient) against a hand-written loop; the built-in CartPole."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from traineval import TrainingManager
from traineval.loggers import read_jsonl
from traineval.modes import Reinforcement
from traineval.modes.envs import CartPole, Discrete, make_env
from traineval.modes.policy_gradient import PolicyGradient, PolicyGradientStep
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, plain_sgd_config

# cuts some walks before their own limit: bootstrapping
RL = Reinforcement(updates_per_epoch=3, episodes_per_update=4, gamma=0.9, max_episode_steps=5)


class Walk:
    """A short random walk on a line: reward -|position|, ends at +-3 or after 6 steps."""

    def __init__(self) -> None:
        self.action_space = Discrete(2)
        self.rng = np.random.default_rng()

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.position, self.steps = int(self.rng.integers(-1, 2)), 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.position / 3, self.steps / 6], dtype=np.float32)

    def step(self, action):
        self.position += 1 if action == 1 else -1
        self.steps += 1
        terminated = abs(self.position) >= 3
        truncated = not terminated and self.steps >= 6
        return self._obs(), -abs(self.position), terminated, truncated, {}


class ActorCritic(nn.Module):
    def __init__(self, value: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(2, 8)
        self.pi = nn.Linear(8, 2)
        self.v = nn.Linear(8, 1) if value else None

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.pi(h) if self.v is None else (self.pi(h), self.v(h))


def _config(quiet_config, **overrides):
    return plain_sgd_config(
        quiet_config,
        **{
            "num_epochs": 2,
            "learning_rate": 0.05,
            "early_stopping_patience": 0,
            **overrides,
        },
    )


def _reference(model, updates, lr, gamma, value_coef, entropy_coef, max_steps):
    """Policy gradient written out: same draw order (seeds, then one batched sample per step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    envs = [Walk() for _ in range(4)]
    mean_returns = []
    for _ in range(updates):
        obs = [env.reset(seed=int(torch.randint(2**31 - 1, ()).item()))[0] for env in envs]
        logp = [[] for _ in envs]
        ent = [[] for _ in envs]
        val = [[] for _ in envs]
        rew = [[] for _ in envs]
        boot = [0.0] * len(envs)
        active, t = list(range(len(envs))), 0
        while active:
            out = model(torch.as_tensor(np.stack([obs[i] for i in active])))
            logits, values = out if isinstance(out, tuple) else (out, None)
            actions = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            lp = logits.log_softmax(-1)
            t += 1
            still = []
            for row, i in enumerate(active):
                a = int(actions[row])
                logp[i].append(lp[row, a])
                ent[i].append(-(lp[row].exp() * lp[row]).sum())
                if values is not None:
                    val[i].append(values[row, 0])
                obs[i], r, term, trunc, _ = envs[i].step(a)
                rew[i].append(r)
                if term:
                    continue
                if trunc or t >= max_steps:
                    if values is not None:
                        with torch.no_grad():
                            boot[i] = float(model(torch.as_tensor(obs[i])[None])[1][0, 0])
                    continue
                still.append(i)
            active = still
        mean_returns.append(np.mean([sum(r) for r in rew]))
        returns = []
        for i in range(len(envs)):
            g, out_i = boot[i], []
            for r in reversed(rew[i]):
                g = r + gamma * g
                out_i.append(g)
            returns += out_i[::-1]
        returns = torch.tensor(returns)
        log_probs = torch.stack([x for row in logp for x in row])
        entropy = torch.stack([x for row in ent for x in row]).mean()
        if val[0]:
            v = torch.stack([x for row in val for x in row])
            adv = returns - v.detach()
            value_loss = F.mse_loss(v, returns)
        else:
            adv = returns - returns.mean()
            value_loss = torch.tensor(0.0)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        loss = -(log_probs * adv).mean() + value_coef * value_loss - entropy_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mean_returns


@pytest.mark.parametrize("value", [True, False])
def test_policy_gradient_equals_a_hand_written_loop(quiet_config, value):
    ours, theirs = ActorCritic(value), ActorCritic(value)
    config = _config(quiet_config, log_frequency=6)
    torch.manual_seed(config.seed)  # the run seeds the global generator with config.seed
    mode = dataclasses.replace(RL, eval_episodes=2)
    result = TrainingManager(config).train(ours, Walk, mode=mode)
    torch.manual_seed(config.seed)
    mean_returns = _reference(theirs, 6, 0.05, 0.9, 0.5, 0.01, max_steps=5)
    logged = [
        r
        for r in read_jsonl(Path(config.output_dir) / "metrics.jsonl")
        if r.get("event") == "train"
    ]
    assert logged[-1]["train_episode_return"] == pytest.approx(np.mean(mean_returns))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert result["global_step"] == 6
    assert set(result["training_history"]["val_metrics"][-1]) == {"return", "episode_length"}


def test_a_policy_returning_a_mapping_trains_like_one_returning_a_tuple(quiet_config, tmp_path):
    class MappingPolicy(ActorCritic):
        def forward(self, x):
            logits, value = super().forward(x)
            return {"logits": logits, "value": value}

    models = []
    for name, model in (("tuple", ActorCritic()), ("mapping", MappingPolicy())):
        config = _config({**quiet_config, "output_dir": str(tmp_path / name)})
        TrainingManager(config).train(model, Walk, mode=RL)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_returns_bootstrap_only_episodes_cut_by_the_time_limit():
    step = PolicyGradientStep(Walk, PolicyGradient(gamma=0.5), episodes=1)
    ended = {"rewards": [1.0, 1.0, 1.0], "bootstrap": 0.0}
    cut = {"rewards": [1.0, 1.0, 1.0], "bootstrap": 8.0}
    assert step._returns(ended).tolist() == [1.75, 1.5, 1.0]
    assert step._returns(cut).tolist() == [2.75, 3.5, 5.0]


def test_cartpole_learns_to_balance(quiet_config):
    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(4, 64), nn.Tanh())
            self.pi, self.v = nn.Linear(64, 2), nn.Linear(64, 1)

        def forward(self, x):
            h = self.body(x)
            return self.pi(h), self.v(h)

    config = _config(
        quiet_config,
        num_epochs=6,
        optimizer_type="adamw",
        learning_rate=3e-3,
    )
    mode = Reinforcement(updates_per_epoch=10, episodes_per_update=8, max_episode_steps=500)
    mode = dataclasses.replace(mode, eval_episodes=5, environment="CartPole")
    result = TrainingManager(config).train(Policy(), None, mode=mode)  # the mode's environment
    returns = [m["return"] for m in result["training_history"]["val_metrics"]]
    assert max(returns) > 200  # a random policy lasts about 20 steps
    assert result["monitor_metric"] == "val_return"
    assert result["best_metric"] == max(returns)


def test_builtin_cartpole_matches_gymnasium():
    gymnasium = pytest.importorskip("gymnasium")
    theirs = gymnasium.make("CartPole-v1")
    ours = CartPole()
    rng = np.random.default_rng(0)
    for seed in range(3):
        theirs.reset(seed=seed)
        ours.reset()
        ours._state = np.array(theirs.unwrapped.state, dtype=np.float64)
        while True:
            action = int(rng.integers(2))
            expected = theirs.step(action)
            got = ours.step(action)
            np.testing.assert_array_equal(got[0], expected[0])
            assert got[1:4] == expected[1:4]
            if expected[2] or expected[3]:
                break


def test_reinforcement_errors_are_clear(quiet_config, monkeypatch):
    config = _config(quiet_config)
    with pytest.raises(ValueError, match="takes an environment factory"):
        TrainingManager(config).train(ActorCritic(), [1, 2, 3], mode=RL)
    with pytest.raises(ValueError, match="pass no val_loader"):
        TrainingManager(config).train(ActorCritic(), Walk, [1], mode=RL)
    with pytest.raises(ValueError, match="monitor_metric='val_accuracy' is invalid in mode="):
        TrainingManager(_config(quiet_config, monitor_metric="val_accuracy")).train(
            ActorCritic(), Walk, mode=RL
        )
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # as if it were not installed
    with pytest.raises(ImportError, match="environment 'Acrobot-v1' needs gymnasium"):
        TrainingManager(config).train(ActorCritic(), "Acrobot-v1", mode=RL)
    with pytest.raises(ValueError, match=r"ppo\.gamma=1\.5 is invalid"):
        Reinforcement(gamma=1.5)  # PPO: the algorithm the settings chose
    with pytest.raises(ValueError, match=r"policy_gradient\.gamma=1\.5 is invalid"):
        Reinforcement(gamma=1.5, episodes_per_update=4)


def test_a_resumed_run_collects_the_episodes_an_uninterrupted_one_does(quiet_config, tmp_path):
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = ActorCritic()
    TrainingManager(_config(quiet_config, num_epochs=4, optimizer_type="adamw")).train(
        straight, Walk, mode=RL
    )
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    TrainingManager(_config(quiet_config, num_epochs=2, optimizer_type="adamw")).train(
        ActorCritic(), Walk, mode=RL
    )
    resumed = ActorCritic()
    result = TrainingManager(_config(quiet_config, num_epochs=4, optimizer_type="adamw")).train(
        resumed, Walk, mode=RL, resume_from="auto"
    )
    assert result["global_step"] == 12
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resuming_inside_an_epoch_replays_the_same_episodes(quiet_config, tmp_path):
    settings = {"num_epochs": 2, "optimizer_type": "adamw", "eval_frequency": 2}
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = ActorCritic()
    first = TrainingManager(_config(quiet_config, **settings)).train(straight, Walk, mode=RL)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # a SIGTERM during update 4 of 6 (epoch 2)
        TrainingManager(_config(quiet_config, **settings)).train(
            ActorCritic(), Walk, mode=RL, callbacks=[InterruptAt(4)]
        )
    resumed = ActorCritic()
    result = TrainingManager(_config(quiet_config, **settings)).train(
        resumed, Walk, mode=RL, resume_from="auto"
    )
    assert result["global_step"] == 6
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # validation plays fresh episodes each time, the same ones after a resume
    validations = first["training_history"]["val_metrics"]
    assert result["training_history"]["val_metrics"] == validations
    assert len({m["episode_length"] for m in validations}) > 1


def test_reinforcement_from_a_config_file(tmp_path):
    import json

    from traineval.cli import main
    from traineval.commands.experiment import RunConfig

    config = tmp_path / "rl.yaml"
    config.write_text(
        "mode: {name: reinforcement, environment: CartPole, updates_per_epoch: 4, "
        "eval_episodes: 3}\nmodel: {name: actor_critic}\n"
        "training: {num_epochs: 2, learning_rate: 3.0e-3, warmup_steps: 0, "
        "scheduler_type: constant, tensorboard_logging: false}\n"
    )
    assert main(["fit", str(config), "-q", f"training.output_dir={tmp_path / 'run'}"]) == 0
    record = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"return", "episode_length"}
    assert record["test"]["return"] >= 8  # CartPole's shortest possible episode
    assert record["monitor_metric"] == "val_return"
    assert main(["evaluate", str(tmp_path / "run")]) == 0  # the same test episodes again
    again = json.loads((tmp_path / "run" / "evaluation" / "metrics_test.json").read_text())
    assert again["metrics"] == record["test"]
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val"]) == 2  # episodes only
    with pytest.raises(ValueError, match=r"mode\.environment=None is invalid: mode: ppo needs"):
        RunConfig.from_dict({"mode": "reinforcement"})


def test_environments_are_checked_up_front_and_integer_observations_one_hot(quiet_config):
    gymnasium = pytest.importorskip("gymnasium")
    from traineval.modes.envs import OneHotObservations

    assert make_env("CartPole") is CartPole  # the built-in one, by its own name
    assert isinstance(make_env("CartPole-v1")().unwrapped, gymnasium.Env)  # gymnasium's
    config = _config(quiet_config)

    class Switches(CartPole):  # several on/off actions at once: no policy plays those
        def __init__(self):
            super().__init__()
            self.action_space = gymnasium.spaces.MultiBinary(3)

    with pytest.raises(ValueError, match=r"neither discrete .* nor a 1-d Box of continuous"):
        TrainingManager(config).train(ActorCritic(), Switches, mode=RL)

    class Bare:  # gymnasium's reset / step and nothing else: the policy's logits decide
        def __init__(self):
            self.env = CartPole()

        def reset(self, seed=None):
            return self.env.reset(seed=seed)

        def step(self, action):
            return self.env.step(action)

    mode = Reinforcement(updates_per_epoch=2, episodes_per_update=2, max_episode_steps=20)
    assert mode.environment_factory(Bare) is Bare  # no action space: accepted as before
    factory = mode.environment_factory("FrozenLake-v1")
    env = factory()
    assert isinstance(env, OneHotObservations)
    observation, _ = env.reset(seed=0)
    assert observation.shape == (16,)
    assert observation.sum() == 1
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    result = TrainingManager(_config(quiet_config, num_epochs=1)).train(
        policy, "FrozenLake-v1", mode=dataclasses.replace(mode, eval_episodes=2)
    )
    assert result["global_step"] == 2


def test_dict_observations_are_refused_with_the_wrapper_that_flattens_them():
    gymnasium = pytest.importorskip("gymnasium")
    from gymnasium import spaces

    class Goals(gymnasium.Env):
        observation_space = spaces.Dict(
            {"position": spaces.Box(-1, 1, (2,)), "goal": spaces.Discrete(3)}
        )
        action_space = spaces.Discrete(2)

    with pytest.raises(
        ValueError,
        match=r"environment Goals: its observations are a Dict space.*FlattenObservation",
    ):
        Reinforcement().environment_factory(Goals)
    flat = Reinforcement().environment_factory(
        lambda: gymnasium.wrappers.FlattenObservation(Goals())
    )
    assert flat().observation_space.shape == (5,)


def test_an_unknown_environment_id_is_one_line_naming_the_setting():
    """gymnasium's NameNotFound came out bare with exit 1 (a fault of the machine), not as
    the bad value it is."""
    pytest.importorskip("gymnasium")
    from traineval.modes.envs import make_env

    with pytest.raises(ValueError, match=r"mode\.environment='Bogus-v0' is invalid: .*Bogus"):
        make_env("Bogus-v0")
    assert make_env("CartPole-v1") is not None


class _Diverged(ActorCritic):
    """A policy whose weights went infinite through finite losses (the rollout sees it)."""

    def forward(self, x):
        logits, value = super().forward(x)
        return logits * float("inf"), value


@pytest.mark.parametrize("mode", ["pg", "ppo"])
def test_a_policy_that_diverged_stops_with_its_own_sentence(quiet_config, tmp_path, mode):
    """torch's sampling said 'probability tensor contains either inf, nan or element < 0';
    it is a non-finite stop like a NaN loss's, naming the policy's outputs."""
    from test_ppo import PPO
    from traineval.training.steplog import NonFiniteError

    config = _config({**quiet_config, "output_dir": str(tmp_path)})
    with pytest.raises(NonFiniteError, match=r"the policy's outputs are not finite"):
        TrainingManager(config).train(_Diverged(), Walk, mode=RL if mode == "pg" else PPO)
