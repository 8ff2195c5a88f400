"""A trained model back in Python: `traineval.load_model(run_dir)` and
`traineval.load_checkpoint(path, model)`, checked against what the run itself measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import traineval
from traineval import TrainingConfig, TrainingManager
from traineval.cli import main
from traineval.commands.experiment import RunConfig, run_parts

from conftest import iris_demo, make_classification, make_mlp


def test_load_model_gives_the_run_s_best_model_and_its_test_accuracy(tmp_path):
    run = tmp_path / "run"
    assert main(iris_demo(run, "training.num_epochs=3")) == 0
    model = traineval.load_model(run)
    assert not model.training
    test = run_parts(RunConfig.from_run_dir(run)).splits.test
    x, y = test.tensors
    with torch.no_grad():
        accuracy = int((model(x).argmax(dim=1) == y).sum()) / len(y)
    recorded = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    assert accuracy == pytest.approx(recorded["accuracy"], abs=1e-12)
    last = traineval.load_model(run, "last")
    saved = traineval.load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert last.state_dict().keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(last.state_dict()[key], value), key
    with pytest.raises(ValueError, match="epoch-0099"):
        traineval.load_model(run, "epoch-0099")


def test_load_checkpoint_loads_the_weights_training_kept(quiet_config, tmp_path):
    config = TrainingConfig(num_epochs=2, batch_size=8, **quiet_config)
    trained = make_mlp()
    data = DataLoader(make_classification(n=32), 8)
    result = TrainingManager(config).train(trained, data, data)
    best = result.checkpoints["best"]
    model = make_mlp()
    contents = traineval.load_checkpoint(best, model)
    assert contents["global_step"] == 8
    assert contents["model"].keys() == trained.state_dict().keys()
    for key, value in contents["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    exported = traineval.load_checkpoint(best.replace(".pt", ".safetensors"), make_mlp())
    assert exported["model"].keys() == trained.state_dict().keys()
    with pytest.raises(ValueError, match="holds weights only: pass the model"):
        traineval.load_checkpoint(best.replace(".pt", ".safetensors"))
    with pytest.raises(ValueError, match="another model"):
        traineval.load_checkpoint(best, nn.Sequential(nn.Linear(3, 1)))


def test_both_are_public_names():
    done = subprocess.run(
        [sys.executable, "-c", "from traineval import load_checkpoint, load_model; print('ok')"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout == "ok\n", done.stderr


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_model_with_extra_state_exports_and_loads_its_weights(quiet_config, background):
    """A module's extra state (`get_extra_state`: any value, not a tensor) crashed the best
    export (safetensors holds tensors only): the export holds the tensors, the checkpoint
    the extra state too, and both load back."""
    from test_sharded_checkpoints import WithExtraState

    model = WithExtraState()
    data = DataLoader(make_classification(n=48, seed=4), batch_size=8)
    config = TrainingConfig(**{**quiet_config, "num_epochs": 2, "async_checkpointing": background})
    TrainingManager(config).train(model, data, data)
    best = config.output_dir + "/checkpoints/best"
    from_export, from_checkpoint = WithExtraState(), WithExtraState()
    traineval.load_checkpoint(best + ".safetensors", from_export)
    traineval.load_checkpoint(best + ".pt", from_checkpoint)
    assert torch.equal(from_export.net.weight, from_checkpoint.net.weight)
    assert not torch.equal(from_export.net.weight, WithExtraState().net.weight)  # trained
    assert from_export.calls == 0  # the export has no extra state: the model keeps its own
    assert from_checkpoint.calls > 0


def test_load_model_needs_only_the_run_directory_of_a_table_run(tmp_path):
    """It split the training table again to shape the model: with the table moved it
    failed (data.path does not exist), with a row's label edited it said the label could
    not be split. The run's data.json (what predict reads) is enough."""
    import shutil

    from test_hostile_inputs import train_on_a_table

    run, table = train_on_a_table(tmp_path)
    inputs = torch.randn(5, 2)
    with torch.no_grad():
        before = traineval.load_model(run)(inputs)
    shutil.move(table, tmp_path / "moved.csv")
    with torch.no_grad():
        assert torch.equal(traineval.load_model(run)(inputs), before)
    with pytest.raises(FileNotFoundError, match="is not a run directory: it does not exist"):
        traineval.load_model(tmp_path / "nope")
