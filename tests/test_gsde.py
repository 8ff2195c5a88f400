"""gSDE exploration (`ActorCritic(sde=True)`, the mode's `sde_sample_freq`): the action
distribution written out, the noise `features @ W` with W held for `sde_sample_freq` steps,
learning, exact resume, errors; against Stable-Baselines3 in tests/test_ppo_sb3.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_continuous_actions import PPO, Reach, _config
from traineval import TrainingManager
from traineval.models import ActorCritic
from traineval.modes import Reinforcement
from traineval.modes.actions import ActionHead
from traineval.modes.ppo import PPO as PPOSettings
from traineval.modes.ppo import PPOStep
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt

SDE = dataclasses.replace(PPO, sde_sample_freq=4)


def _policy(**options):
    torch.manual_seed(0)
    return ActorCritic(2, 2, hidden_sizes=(32,), gaussian=True, sde=True, **options)


def test_the_action_distribution_is_the_normal_the_noise_matrices_give():
    policy = _policy(log_std_init=-0.5)
    obs = torch.randn(5, 2)
    out = policy(obs)
    features = policy.body(obs)
    mean = policy.policy(features)
    variance = features.square() @ policy.sde_log_std.exp().square()
    normal = torch.distributions.Normal(mean, (variance + 1e-6).sqrt())
    actions = torch.randn(5, 1)
    head = ActionHead.of(Reach())
    torch.testing.assert_close(
        head.log_prob(out["logits"], actions), normal.log_prob(actions).sum(-1)
    )
    torch.testing.assert_close(head.entropy(out["logits"]), normal.entropy().sum(-1))
    assert torch.equal(out["sde_features"], features)
    assert not out["sde_features"].requires_grad  # the noise does not train the body
    out["logits"].sum().backward()
    assert policy.sde_log_std.grad is not None  # the log stds learn through the log-prob
    assert policy.body[0].weight.grad is not None  # the body through the means


class Recorded(Reach):
    """Reach with wide bounds (no clipping), so the played actions are the sampled ones."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space.low[:] = -1e6
        self.action_space.high[:] = 1e6

    def step(self, action):
        self.position += float(action[0])
        self.steps += 1
        return self._obs(), 0.0, False, self.steps >= 8, {}


@pytest.mark.parametrize(("freq", "draws"), [(4, 3), (-1, 1), (1, 10)])
def test_the_noise_is_features_times_a_matrix_held_for_sde_sample_freq_steps(
    monkeypatch, freq, draws
):
    policy, drawn = _policy(), []
    original = ActorCritic.exploration_weights

    def recording(self, n, generator=None):
        drawn.append(original(self, n, generator))
        return drawn[-1]

    monkeypatch.setattr(ActorCritic, "exploration_weights", recording)
    settings = PPOSettings(envs=3, rollout_steps=10, minibatch_size=30, sde_sample_freq=freq)
    step = PPOStep(Recorded, settings)
    step(policy, None)  # collects one rollout of 10 steps of 3 environments
    assert len(drawn) == draws  # at the start, then every `freq` steps
    rollout = step.rollout
    with torch.no_grad():
        out = policy(rollout["observations"])
    noise = rollout["actions"] - out["logits"][:, :1]
    for row in range(30):  # rows: step t of environment i at t * 3 + i
        t, i = divmod(row, 3)
        weights = drawn[t // freq if freq > 0 else 0][i]
        torch.testing.assert_close(noise[row], out["sde_features"][row] @ weights)
    assert all(w.shape == (3, 32, 1) for w in drawn)


def test_a_gsde_policy_learns_to_reach(quiet_config):
    policy = _policy()
    before = SDE.score(policy, Reach, torch.device("cpu"))["return"]
    config = _config(quiet_config, num_epochs=6, restore_best_weights=True)
    TrainingManager(config).train(policy, Reach, mode=SDE)
    after = SDE.score(policy, Reach, torch.device("cpu"))["return"]
    assert after > before + 2.0, (before, after)


def test_a_gsde_run_interrupted_inside_a_rollout_resumes_exactly(quiet_config, tmp_path):
    mode = dataclasses.replace(SDE, rollout_steps=10)
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = _policy()
    TrainingManager(_config(quiet_config)).train(straight, Reach, mode=mode)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):  # update 14: inside the second rollout
        TrainingManager(_config(quiet_config)).train(
            _policy(), Reach, mode=mode, callbacks=[InterruptAt(14)]
        )
    resumed = _policy()
    TrainingManager(_config(quiet_config)).train(resumed, Reach, mode=mode, resume_from="auto")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gsde_errors_are_clear(quiet_config):
    with pytest.raises(ValueError, match=r"sde=True is gSDE exploration .* needs gaussian=True"):
        ActorCritic(2, 2, sde=True)
    with pytest.raises(ValueError, match=r"sde_sample_freq=0 is invalid: expected -1"):
        Reinforcement(sde_sample_freq=0)
    with pytest.raises(ValueError, match=r"sde_sample_freq.*setting of algorithm='ppo'"):
        Reinforcement(algorithm="policy_gradient", sde_sample_freq=4)
    from test_reinforcement import Walk  # discrete actions

    with pytest.raises(ValueError, match=r"sde_features .* continuous actions; this .* discrete"):
        TrainingManager(_config(quiet_config)).train(_policy(), Walk, mode=SDE)
