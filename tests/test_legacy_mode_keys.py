"""The flat mode keys of earlier versions still load from config files and checkpoints, warn
with the new key, and train the same run as the mode settings they became; in Python they
are an error naming the new key."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager, TrainingMode
from traineval.commands.experiment import RunConfig
from traineval.config import LEGACY_MODE_KEYS
from traineval.data import Episodes
from traineval.modes import Federated, MetaLearning, SemiSupervised, resolve_mode

from conftest import make_classification, make_mlp, plain_sgd_config

# a value other than the default for every legacy key
VALUES = {
    "unlabeled_label": -3,
    "unlabeled_weight": 0.5,
    "pseudo_label_threshold": 0.8,
    "rl_episodes_per_update": 3,
    "rl_updates_per_epoch": 2,
    "rl_gamma": 0.9,
    "rl_value_coef": 0.25,
    "rl_entropy_coef": 0.0,
    "rl_normalize_advantages": False,
    "rl_max_episode_steps": 50,
    "rl_eval_episodes": 2,
    "meta_algorithm": "reptile",
    "meta_inner_lr": 0.3,
    "meta_inner_steps": 2,
    "federated_clients": 3,
    "federated_partition": "dirichlet",
    "federated_dirichlet_alpha": 0.3,
    "federated_local_epochs": 2,
    "federated_client_fraction": 0.5,
    "federated_server_lr": 0.7,
    "federated_server_momentum": 0.5,
}


def test_every_legacy_key_is_covered_here():
    assert set(VALUES) == set(LEGACY_MODE_KEYS)


@pytest.mark.parametrize("key", sorted(LEGACY_MODE_KEYS))
def test_each_legacy_key_becomes_its_modes_setting_with_a_warning(key):
    mode, setting = LEGACY_MODE_KEYS[key]
    value = VALUES[key]
    with pytest.warns(FutureWarning, match=rf"{key} is deprecated: .*{mode} mode's '{setting}'"):
        config = TrainingConfig.from_dict({key: value})  # a config file's, a checkpoint's
    assert config.mode_settings == {mode: {setting: value}}
    resolved = resolve_mode(mode, config)
    assert getattr(resolved, setting) == value
    assert resolved == type(resolved).from_settings({setting: value})
    with pytest.raises(
        TypeError, match=rf"no field '{key}': it is now the {mode} mode's '{setting}'"
    ):
        TrainingConfig(**{key: value})  # Python: the new key, named


def test_an_invalid_legacy_value_is_named_as_written():
    with pytest.raises(ValueError, match=r"rl_gamma=1\.5 is invalid: expected a discount"):
        TrainingConfig.from_dict({"rl_gamma": 1.5})
    with pytest.raises(ValueError, match=r"federated_clients=0 is invalid: expected an integer"):
        TrainingConfig.from_dict({"federated_clients": 0})


def _with(config, legacy):
    """`config` with flat keys of an earlier version added, as a config file gives them."""
    return TrainingConfig.from_dict({**config.to_dict(), **legacy})


def _weights_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_legacy_keys_train_the_same_run_as_the_mode_settings(quiet_config, tmp_path):
    data = make_classification(n=48)
    runs = [
        (
            {"federated_clients": 3, "federated_local_epochs": 2},
            Federated(clients=3, local_epochs=2),
        ),
        ({"pseudo_label_threshold": 0.4}, SemiSupervised(pseudo_label_threshold=0.4)),
    ]
    for legacy, mode in runs:
        models = []
        for i, (settings, how) in enumerate(((legacy, TrainingMode(mode.name)), ({}, mode))):
            quiet_config["output_dir"] = str(tmp_path / f"{mode.name}-{i}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = _with(plain_sgd_config(quiet_config, num_epochs=2), settings)
            assert len(caught) == len(settings)  # one FutureWarning per legacy key
            model = make_mlp()
            TrainingManager(config).train(model, DataLoader(data, 8), mode=how)
            models.append(model)
        assert _weights_equal(*models), mode.name


def test_legacy_meta_keys_train_the_same_run(quiet_config, tmp_path):
    tasks = Episodes(make_classification(n=60, classes=4), 3, 2, 3, episodes=8, seed=0)
    models = []
    for i, (settings, mode) in enumerate(
        (
            ({"meta_algorithm": "fomaml", "meta_inner_lr": 0.2}, TrainingMode.META_LEARNING),
            ({}, MetaLearning(algorithm="fomaml", inner_lr=0.2)),
        )
    ):
        quiet_config["output_dir"] = str(tmp_path / str(i))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = _with(plain_sgd_config(quiet_config, num_epochs=1, batch_size=4), settings)
        assert [w.category for w in caught] == [FutureWarning] * len(settings)
        model = make_mlp()
        TrainingManager(config).train(model, DataLoader(tasks, batch_size=4), mode=mode)
        models.append(model)
    assert _weights_equal(*models)


def test_the_old_config_file_layout_loads_into_the_mode_section():
    old = {
        "mode": "meta_learning",
        "data": {"ways": 3, "shots": 2, "train_episodes": 40},
        "training": {"meta_inner_lr": 0.5, "num_epochs": 2},
    }
    new = {
        "mode": {"name": "meta_learning", "ways": 3, "shots": 2, "train_episodes": 40},
        "training": {"num_epochs": 2},
    }
    new["mode"]["inner_lr"] = 0.5
    with pytest.warns(FutureWarning, match=r"data\.ways is deprecated"):
        loaded = RunConfig.from_dict(old)
    assert loaded == RunConfig.from_dict(new)
    assert loaded.mode == MetaLearning(ways=3, shots=2, train_episodes=40, inner_lr=0.5)
    assert RunConfig.from_dict(loaded.to_dict()) == loaded  # the new layout round-trips
    with pytest.warns(FutureWarning, match=r"data\.environment is deprecated"):
        rl = RunConfig.from_dict({"mode": "reinforcement", "data": {"environment": "CartPole"}})
    assert rl.mode.environment == "CartPole"


def test_a_checkpoint_from_before_the_mode_record_resumes(quiet_config, tmp_path):
    """Checkpoints of earlier versions hold the flat keys in their config and no `mode`."""
    data = DataLoader(make_classification(n=48), batch_size=8)
    quiet_config["output_dir"] = str(tmp_path / "run")
    mode = Federated(clients=3)
    first = TrainingManager(plain_sgd_config(quiet_config, num_epochs=1))
    first.train(make_mlp(), data, mode=mode)
    longer = plain_sgd_config(quiet_config, num_epochs=2)
    with pytest.raises(ValueError, match="checkpoint was trained in mode='federated'"):
        TrainingManager(longer).train(make_mlp(), data, resume_from="auto")
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(path, weights_only=True)
    del payload["mode"]
    payload["config"] = {**payload["config"], "federated_clients": 3}
    del payload["config"]["mode_settings"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"federated\.clients: checkpoint 3, now 4"):
        TrainingManager(longer).train(make_mlp(), data, mode=Federated(), resume_from="auto")
    result = TrainingManager(longer).train(make_mlp(), data, mode=mode, resume_from="auto")
    assert result.global_step == 2
