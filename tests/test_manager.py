"""TrainingManager.train: results, run directory, checkpoints, modes and input errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from traineval import TaskType, TrainingConfig, TrainingManager, TrainingMode
from traineval.loggers import read_jsonl
from traineval.runs.checkpoint import CheckpointError, load_checkpoint_file

from conftest import make_classification, make_mlp


def _config(quiet_config, **overrides):
    quiet_config.update(overrides)
    quiet_config.setdefault("num_epochs", 2)
    quiet_config.setdefault("batch_size", 16)
    return TrainingConfig(**quiet_config)


def test_result_has_the_spec_keys_and_per_epoch_history(quiet_config):
    data = make_classification(n=64)
    config = _config(quiet_config, num_epochs=3, learning_rate=1e-2)
    result = TrainingManager(config).train(
        make_mlp(),
        DataLoader(data, 16, shuffle=True),
        DataLoader(data, 32),
        task_type=TaskType.CLASSIFICATION,
    )
    history = result["training_history"]
    for key in ("train_loss", "val_loss", "learning_rate", "val_metrics"):
        assert len(history[key]) == 3, key
    assert set(history["val_metrics"][0]) == {
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "log_loss",
    }
    assert history["train_loss"][-1] < history["train_loss"][0]
    for key in ("best_metric", "best_epoch", "global_step", "stopped_early", "output_dir"):
        assert key in result
    assert result["global_step"] == result.global_step == 12
    assert result["best_metric"] == min(history["val_loss"])
    with pytest.raises(KeyError, match="no result named 'accuracy'"):
        result["accuracy"]


def test_run_directory_records_config_metrics_and_checkpoints(quiet_config, tmp_path):
    data = make_classification(n=64)
    config = _config(quiet_config, num_epochs=4, log_frequency=2, checkpoint_save_frequency=2)
    manager = TrainingManager(config)
    result = manager.train(make_mlp(), DataLoader(data, 16), DataLoader(data, 64))
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert TrainingConfig.from_dict(saved["training"]) == config
    assert saved["mode"] == {"name": "supervised"}  # the mode it ran, with its settings
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert {
        "train_step_loss",
        "learning_rate",
        "samples_per_sec",
        "step_time_ms",
        "grad_norm",
    } <= set(train[0])
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert "val_accuracy" in evals[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "best.safetensors", "epoch-0002.pt", "epoch-0004.pt", "last.pt"]
    checkpoint = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert checkpoint["global_step"] == 16
    assert checkpoint["config"]["batch_size"] == 16
    assert {"model", "optimizer", "scheduler", "loop", "rng", "tracker"} <= set(checkpoint)
    assert len(json.loads(checkpoint["loop"]["history"])["train_loss"]) == 4  # one string
    fresh = make_mlp(seed=99)
    manager.load_checkpoint(run / "checkpoints" / "last.pt", fresh)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), checkpoint["model"].values(), strict=True)
    )
    assert result["checkpoints"]["best"].endswith("best.pt")


def test_an_earlier_runs_checkpoints_are_never_overwritten(quiet_config, tmp_path):
    data = make_classification(n=32)
    TrainingManager(_config(dict(quiet_config))).train(make_mlp(), DataLoader(data, 16))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        TrainingManager(_config(dict(quiet_config))).train(make_mlp(), DataLoader(data, 16))
    assert last.read_bytes() == before
    TrainingManager(_config(dict(quiet_config), overwrite_output_dir=True)).train(
        make_mlp(), DataLoader(data, 16)
    )


def test_evaluates_every_eval_frequency_updates_and_at_epoch_end(quiet_config):
    data = make_classification(n=80)  # 5 updates per epoch
    config = _config(quiet_config, eval_frequency=2)
    result = TrainingManager(config).train(make_mlp(), DataLoader(data, 16), DataLoader(data, 80))
    assert result["training_history"]["val_steps"] == [2, 4, 5, 6, 8, 10]


def test_no_per_step_host_sync(quiet_config, monkeypatch):
    """Reading a tensor (.item) happens once per log interval, never per step."""
    calls = []
    original = torch.Tensor.item

    def counting_item(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    config = _config(quiet_config, num_epochs=2, batch_size=2, log_frequency=10)
    result = TrainingManager(config).train(make_mlp(), DataLoader(make_classification(n=100), 2))
    assert result["global_step"] == 100
    # two reads per log interval; per epoch, the epoch loss (two) and the loader's base seed
    assert len(calls) <= 2 * (100 // 10) + 3 * 2


def test_checkpoint_that_is_not_a_plain_dict_of_tensors_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle") as refused:
        load_checkpoint_file(path)
    assert not (tmp_path / "pwned").exists()
    # one line, naming what it would have loaded, without torch's advice to load it unsafely
    said = str(refused.value)
    assert "\n" not in said
    assert "GLOBAL" in said
    assert "weights_only" not in said
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # not a file (reading it would block): named so, not "does not exist"
    with pytest.raises(CheckpointError, match=r"fifo\.pt' is not a regular file"):
        load_checkpoint_file(fifo)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"evil\.pt.*truncated or corrupt"):
        load_checkpoint_file(path)


def test_unsupervised_autoencoder_learns_to_reconstruct(quiet_config):
    torch.manual_seed(0)
    x = torch.randn(128, 4) @ torch.randn(4, 12)  # rank-4 data in 12 dimensions
    model = nn.Sequential(nn.Linear(12, 6), nn.Linear(6, 12))
    config = _config(quiet_config, num_epochs=30, learning_rate=1e-2)
    result = TrainingManager(config).train(
        model,
        DataLoader(TensorDataset(x), 16, shuffle=True),
        DataLoader(TensorDataset(x), 64),
        mode=TrainingMode.UNSUPERVISED,
    )
    losses = result["training_history"]["train_loss"]
    assert losses[-1] < 0.1 * losses[0]
    assert result["training_history"]["val_metrics"][-1]["r2_score"] > 0.9


def test_unsupervised_accepts_a_one_argument_loss(quiet_config):
    x = torch.randn(32, 6)
    model = nn.Linear(6, 6)
    seen = []

    def loss(outputs):
        seen.append(outputs.shape)
        return outputs.pow(2).mean()

    TrainingManager(_config(quiet_config)).train(
        model,
        DataLoader(TensorDataset(x), 16),
        loss_function=loss,
        mode=TrainingMode.UNSUPERVISED,
    )
    assert seen[0] == (16, 6)


def test_dict_batches_are_passed_as_keyword_arguments(quiet_config):
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, features):
            return self.linear(features)

    data = make_classification(n=32)
    batches = [{"features": x, "labels": y} for x, y in DataLoader(data, 16)]
    result = TrainingManager(_config(quiet_config)).train(Keyword(), batches)
    assert result["global_step"] == 4


def test_input_errors_before_training(quiet_config):
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="train_loader is empty"):
        TrainingManager(_config(dict(quiet_config))).train(make_mlp(), empty)
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TrainingManager(_config(dict(quiet_config))).train(
            frozen, DataLoader(make_classification(), 16)
        )
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        TrainingManager(_config(dict(quiet_config))).train("model", [])


def test_loss_that_is_not_a_scalar_is_an_error(quiet_config):
    def per_sample(outputs, targets):  # (a torch loss with reduction='none' is refused first)
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(ValueError, match=r"per_sample returned a tensor of shape \(16,\)"):
        TrainingManager(_config(quiet_config)).train(
            make_mlp(), DataLoader(make_classification(), 16), loss_function=per_sample
        )


class _Stream(IterableDataset):
    def __iter__(self):
        data = make_classification(n=48)
        return iter(zip(*data.tensors, strict=True))


def test_loader_without_len_needs_max_steps(quiet_config):
    loader = DataLoader(_Stream(), batch_size=16)
    with pytest.raises(ValueError, match=r"no len\(\).*set max_steps"):
        TrainingManager(_config(dict(quiet_config))).train(make_mlp(), loader)
    result = TrainingManager(_config(dict(quiet_config), max_steps=5, num_epochs=3)).train(
        make_mlp(), loader
    )
    assert result["global_step"] == 5


def test_a_generator_as_a_loader_is_named_as_read_once(quiet_config, tmp_path):
    """A generator as val_loader trained two epochs, then failed as "the evaluation loader
    yielded no batches"; as train_loader with max_steps, epoch 2 "trained on no data ...
    or every target it yielded was ignored", and without it the advice (max_steps) led
    there. An endless generator with max_steps trains (one pass is all it needs)."""
    data = make_classification(n=32)
    batches = [(data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]) for i in range(0, 32, 8)]
    with pytest.raises(TypeError, match=r"val_loader is an iterator \(generator\), which can be"):
        TrainingManager(_config(dict(quiet_config))).train(
            make_mlp(), batches, (b for b in batches)
        )
    assert not (tmp_path / "run").exists()  # before any work
    with pytest.raises(ValueError, match=r"set max_steps \(a generator or other iterator is read"):
        TrainingManager(_config(dict(quiet_config))).train(make_mlp(), (b for b in batches))
    config = _config(dict(quiet_config), max_steps=8, num_epochs=3)
    with pytest.raises(ValueError, match=r"epoch 2 trained on no data: the train loader is an"):
        TrainingManager(config).train(make_mlp(), iter(batches))

    def endless():
        while True:
            yield from batches

    config = _config(dict(quiet_config), max_steps=6, overwrite_output_dir=True)
    assert TrainingManager(config).train(make_mlp(), endless())["global_step"] == 6


def test_progress_bar_only_when_asked_or_on_a_terminal(quiet_config, capsys):
    data = DataLoader(make_classification(n=32), 16)
    TrainingManager(_config(dict(quiet_config), progress_bar=True)).train(make_mlp(), data)
    assert "Epoch 2/2" in capsys.readouterr().err
    quiet_config.update(progress_bar=None, overwrite_output_dir=True)
    TrainingManager(_config(quiet_config)).train(make_mlp(), data)  # stderr is not a terminal
    assert "Epoch" not in capsys.readouterr().err


def test_spec_save_checkpoint_writes_a_safe_loadable_file(quiet_config, tmp_path):
    manager = TrainingManager(_config(quiet_config))
    model = make_mlp()
    optimizer = manager.setup_optimizer(model)
    path = manager.save_checkpoint(model, optimizer, epoch=3, name="manual")
    assert path == tmp_path / "run" / "checkpoints" / "manual.pt"
    restored = make_mlp(seed=5)
    payload = manager.load_checkpoint(path, restored, manager.setup_optimizer(restored))
    assert payload["epoch"] == 3
    pairs = zip(model.parameters(), restored.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_loss_without_a_graph_is_named(quiet_config):
    """A loss computed from detached outputs failed in backward with autograd's "element 0
    of tensors does not require grad", naming neither the loss nor the cause."""

    def detached(outputs, targets):
        return nn.functional.cross_entropy(outputs.detach(), targets)

    with pytest.raises(ValueError, match=r"loss_function detached returned a loss that carries "):
        TrainingManager(_config(quiet_config)).train(
            make_mlp(), DataLoader(make_classification(), 16), loss_function=detached
        )


def test_train_takes_a_task_by_its_value_and_refuses_another_naming_the_field(tmp_path):
    """train(task_type="regression") failed with a bare KeyError: 'regression' at the first
    validation, though evaluate and score take a task by its value."""
    import pytest
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from traineval import TrainingConfig, TrainingManager

    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32)), batch_size=8)
    config = TrainingConfig(num_epochs=1, warmup_steps=0, progress_bar=False,
                            tensorboard_logging=False, output_dir=str(tmp_path))  # fmt: skip
    result = TrainingManager(config).train(nn.Linear(4, 1), data, data, task_type="regression")
    assert "r2_score" in result.training_history["val_metrics"][-1]
    with pytest.raises(ValueError, match=r"task_type='regress' is invalid: expected one of"):
        TrainingManager(config).train(nn.Linear(4, 1), data, data, task_type="regress")
