"""PPO against Stable-Baselines3 itself, on one of SB3's rollouts (needs the `bench` extra).

SB3 collects a rollout of CartPole-v1; traineval's GAE on that rollout equals SB3's
advantages, and traineval's PPO loss, with the same Adam and gradient clipping, takes the
policy (SB3's initial weights) to SB3's weights after its own `train()`.
"""

from __future__ import annotations

import pytest
import torch

from traineval.models import ActorCritic
from traineval.modes.envs import CartPole
from traineval.modes.ppo import PPO, PPOStep
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
    settings = PPO(envs=8, rollout_steps=32, minibatch_size=256, ppo_epochs=20,
                   gamma=0.98, gae_lambda=0.8, entropy_coef=0.0)  # fmt: skip
    step = PPOStep(CartPole, settings)
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


def test_a_gsde_policys_log_probabilities_and_entropy_equal_stable_baselines3s():
    """`ActorCritic(sde=True)` with SB3's weights (PPO with use_sde on Pendulum-v1) gives
    the log-probabilities and entropies of SB3's gSDE distribution."""
    from stable_baselines3.common.env_util import make_vec_env

    from traineval.modes.actions import ActionHead
    from traineval.modes.envs import make_env

    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    theirs = sb3.PPO("MlpPolicy", env, use_sde=True, seed=0, device="cpu")
    with torch.no_grad():  # a log std matrix that is not all one value
        theirs.policy.log_std.add_(torch.randn_like(theirs.policy.log_std) * 0.3)
    state = theirs.policy.state_dict()
    ours = ActorCritic(3, 2, (64, 64), separate=True, gaussian=True, sde=True)
    weights = {f"{k}.{p}": state[f"{v}.{p}"] for k, v in LAYERS.items() for p in ("weight", "bias")}
    ours.load_state_dict({**weights, "sde_log_std": state["log_std"]})
    obs = torch.randn(16, 3)
    actions = torch.randn(16, 1) * 2
    with torch.no_grad():
        values, log_prob, entropy = theirs.policy.evaluate_actions(obs, actions)
        out = ours(obs)
    head = ActionHead.of(make_env("Pendulum-v1")())
    torch.testing.assert_close(head.log_prob(out["logits"], actions), log_prob)
    torch.testing.assert_close(head.entropy(out["logits"]), entropy)
    torch.testing.assert_close(out["value"], values)
