"""PPO against Stable-Baselines3 itself, on one of SB3's rollouts (needs the `bench` extra).

SB3 collects a rollout of CartPole-v1; traineval's GAE on that rollout equals SB3's
advantages, and traineval's PPO loss, with the same Adam and gradient clipping, takes the
policy (SB3's initial weights) to SB3's weights after its own `train()`.
"""

from __future__ import annotations

import pytest
import torch

from traineval.envs import CartPole
from traineval.models import ActorCritic
from traineval.modes.ppo import PPOStep
from traineval.modes.rollouts import gae

sb3 = pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

LAYERS = {
    "body.0": "mlp_extractor.policy_net.0",
    "body.2": "mlp_extractor.policy_net.2",
    "value_body.0": "mlp_extractor.value_net.0",
    "value_body.2": "mlp_extractor.value_net.2",
    "policy": "action_net",
    "value": "value_net",
}


def _by_env(array) -> torch.Tensor:
    """(T, N, ...) -> (N * T, ...), SB3's flattening order."""
    tensor = torch.as_tensor(array).transpose(0, 1)
    return tensor.reshape(-1, *tensor.shape[2:])


def test_gae_and_the_ppo_update_equal_stable_baselines3_on_its_rollout():
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.utils import obs_as_tensor

    env = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    theirs = sb3.PPO(
        "MlpPolicy", env, n_steps=32, batch_size=256, n_epochs=20, gamma=0.98,
        gae_lambda=0.8, ent_coef=0.0, learning_rate=1e-3, seed=0, device="cpu",
    )  # fmt: skip
    state = theirs.policy.state_dict()
    ours = ActorCritic(4, 2, (64, 64), separate=True)
    ours.load_state_dict(
        {
            f"{k}.{p}": state[f"{v}.{p}"].clone()
            for k, v in LAYERS.items()
            for p in ("weight", "bias")
        }
    )

    class Nothing(BaseCallback):
        def _on_step(self) -> bool:
            return True

    theirs._setup_learn(256, None)
    callback = Nothing()
    callback.init_callback(theirs)
    theirs.collect_rollouts(theirs.env, callback, theirs.rollout_buffer, n_rollout_steps=32)
    buffer = theirs.rollout_buffer
    with torch.no_grad():
        last = theirs.policy.predict_values(obs_as_tensor(theirs._last_obs, "cpu")).reshape(-1)
    starts = torch.as_tensor(buffer.episode_starts).float()
    dones = torch.cat([starts[1:], torch.as_tensor(theirs._last_episode_starts).float()[None]])
    assert dones.sum() > 0  # episodes end inside the rollout
    values = torch.as_tensor(buffer.values).float()
    advantages, _ = gae(torch.as_tensor(buffer.rewards).float(), values, dones, last, 0.98, 0.8)
    torch.testing.assert_close(advantages, torch.as_tensor(buffer.advantages).float())

    data = {
        "observations": _by_env(buffer.observations).float(),
        "actions": _by_env(buffer.actions).long().reshape(-1),
        "log_probs": _by_env(buffer.log_probs).float(),
        "values": _by_env(buffer.values).float(),
        "advantages": _by_env(buffer.advantages).float(),
        "returns": _by_env(buffer.returns).float(),
    }
    step = PPOStep(CartPole, envs=8, rollout_steps=32, minibatch_size=256, epochs=20,
                   gamma=0.98, gae_lambda=0.8, entropy_coef=0.0)  # fmt: skip
    optimizer = torch.optim.Adam(ours.parameters(), lr=1e-3, eps=1e-5)
    for _ in range(20):  # one minibatch of the whole rollout: the shuffle does not matter
        loss, _ = step._loss(ours, data)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5)
        optimizer.step()
    theirs.train()
    state = theirs.policy.state_dict()
    for k, v in LAYERS.items():
        for p in ("weight", "bias"):
            torch.testing.assert_close(ours.state_dict()[f"{k}.{p}"], state[f"{v}.{p}"])
