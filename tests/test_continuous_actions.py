"""Continuous actions: a Gaussian policy for a Box action space, in PPO and policy gradient."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from traineval import TrainingManager
from traineval.models import ActorCritic
from traineval.modes import Reinforcement
from traineval.modes.actions import ActionHead, Categorical, Gaussian
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, plain_sgd_config


class Box:
    """The part of gymnasium's Box a policy needs."""

    def __init__(self, low, high, shape):
        self.low = np.full(shape, low, dtype=np.float32)
        self.high = np.full(shape, high, dtype=np.float32)
        self.shape = shape


class Reach:
    """Move a point on a line towards a target: action in [-1, 1] (the step), reward
    -|target - position|; 8 steps an episode."""

    def __init__(self) -> None:
        self.action_space = Box(-1.0, 1.0, (1,))

    def reset(self, seed=None, options=None):
        rng = np.random.default_rng(seed)
        self.position, self.target = rng.uniform(-2, 2, size=2)
        self.steps = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.position, self.target], dtype=np.float32)

    def step(self, action):
        assert -1.0 <= float(action[0]) <= 1.0  # clipped to the bounds before it arrives
        self.position += float(action[0])
        self.steps += 1
        return self._obs(), -abs(self.target - self.position), False, self.steps >= 8, {}


PPO = Reinforcement(
    algorithm="ppo",
    envs=4,
    rollout_steps=16,
    minibatch_size=16,
    ppo_epochs=4,
    rollouts_per_epoch=4,
    gamma=0.9,
    entropy_coef=0.0,
    max_episode_steps=8,
    eval_episodes=8,
)


def _policy():
    torch.manual_seed(0)
    return ActorCritic(2, 2, hidden_sizes=(32,), gaussian=True, orthogonal_init=True)


def _config(quiet_config, **overrides):
    settings = {"num_epochs": 2, "learning_rate": 3e-3, "optimizer_type": "adam"}
    return plain_sgd_config(quiet_config, **{**settings, **overrides})


def test_the_gaussian_head_is_torchs_normal_and_clips_what_the_environment_gets():
    head = ActionHead.of(Reach())
    assert isinstance(head, Gaussian)
    assert head.outputs == 2
    out = torch.tensor([[0.3, -0.5], [2.5, 0.2]])
    actions = torch.tensor([[0.1], [-1.7]])
    normal = torch.distributions.Normal(out[:, :1], out[:, 1:].exp())
    torch.testing.assert_close(head.log_prob(out, actions), normal.log_prob(actions).sum(-1))
    torch.testing.assert_close(head.entropy(out), normal.entropy().sum(-1))
    assert torch.equal(head.greedy(out), out[:, :1])
    generator = torch.Generator().manual_seed(1)
    sampled = head.sample(out, generator)
    expected = out[:, :1] + out[:, 1:].exp() * torch.randn(
        (2, 1), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(sampled, expected)
    # a sample is data: no gradient flows through it (policy gradient's log-prob would
    # otherwise lose its gradient with respect to the mean)
    assert not head.sample(out.clone().requires_grad_(), generator).requires_grad
    assert [float(a[0]) for a in head.to_env(torch.tensor([[1.5], [-0.25]]))] == [1.0, -0.25]
    assert isinstance(
        ActionHead.of(type("E", (), {"action_space": type("D", (), {"n": 3})()})()), Categorical
    )


def test_action_spaces_it_cannot_play_are_named(quiet_config):
    class Unbounded(Reach):
        def __init__(self):
            self.action_space = Box(-np.inf, np.inf, (1,))

    class Image(Reach):
        def __init__(self):
            self.action_space = Box(-1, 1, (2, 2))

    with pytest.raises(ValueError, match="unbounded actions"):
        TrainingManager(_config(quiet_config)).train(_policy(), Unbounded, mode=PPO)
    with pytest.raises(ValueError, match=r"neither discrete .* nor a 1-d Box"):
        TrainingManager(_config(quiet_config)).train(_policy(), Image, mode=PPO)
    narrow = ActorCritic(2, 3, hidden_sizes=(8,))  # 3 numbers for a 1-d Gaussian
    with pytest.raises(ValueError, match="1-d continuous actions need 2: 1 means, then 1 log"):
        TrainingManager(_config(quiet_config)).train(narrow, Reach, mode=PPO)
    with pytest.raises(ValueError, match="output_dim=3 is invalid with gaussian=True"):
        ActorCritic(2, 3, gaussian=True)


@pytest.mark.parametrize("algorithm", ["ppo", "policy_gradient"])
def test_a_gaussian_policy_learns_to_reach(quiet_config, algorithm):
    """Return of the greedy policy before and after training on the reach task (random
    moves: about -8 over 8 steps; walking to the target and staying: about -4)."""
    mode = PPO if algorithm == "ppo" else Reinforcement(
        algorithm="policy_gradient", episodes_per_update=16, updates_per_epoch=40,
        gamma=0.9, entropy_coef=0.0, max_episode_steps=8, eval_episodes=8,
    )  # fmt: skip
    policy = _policy()
    before = mode.score(policy, Reach, torch.device("cpu"))["return"]
    config = _config(
        quiet_config, num_epochs=6 if algorithm == "ppo" else 4, restore_best_weights=True
    )
    result = TrainingManager(config).train(policy, Reach, mode=mode)
    after = mode.score(policy, Reach, torch.device("cpu"))["return"]
    assert after > before + 2.0, (before, after, result["best_metric"])
    assert policy.log_std.detach().item() < 0  # less exploration than at the start (std 1)


def test_a_continuous_run_interrupted_inside_a_rollout_resumes_exactly(quiet_config, tmp_path):
    """The environments' state holds float actions now: replayed exactly on resume."""
    mode = dataclasses.replace(PPO, rollout_steps=10)  # episodes of 8 straddle rollouts
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = _policy()
    TrainingManager(_config(quiet_config)).train(straight, Reach, mode=mode)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # update 14: 2 into the second rollout (20 steps)
        TrainingManager(_config(quiet_config)).train(
            _policy(), Reach, mode=mode, callbacks=[InterruptAt(14)]
        )
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    actions = saved["step_per_rank"][0]["environments"]["actions"]
    assert all(a.is_floating_point() and a.shape == (4, 1) for a in actions)
    resumed = _policy()
    TrainingManager(_config(quiet_config)).train(resumed, Reach, mode=mode, resume_from="auto")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pendulum_from_a_config_file(tmp_path, capsys):
    """gymnasium's Pendulum-v1 (a 1-d Box): the built-in actor_critic gets a Gaussian head."""
    pytest.importorskip("gymnasium")
    from traineval.cli import main

    config = tmp_path / "pendulum.yaml"
    config.write_text(
        "mode: {name: reinforcement, environment: Pendulum-v1, envs: 2, rollout_steps: 64,\n"
        "       minibatch_size: 64, ppo_epochs: 1, rollouts_per_epoch: 1, eval_episodes: 2}\n"
        "model: {name: actor_critic, options: {hidden_sizes: [16]}}\n"
        f"training: {{num_epochs: 1, warmup_steps: 0, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 0
    out = capsys.readouterr().out
    assert "return" in out
    assert "episode_length  200" in out
