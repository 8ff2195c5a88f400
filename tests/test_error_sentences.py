"""Mistakes a user makes get a sentence that names the value and the fix, not a torch
traceback: labels outside the classes, shapes that do not fit, losses that are not scalars,
YAML with Python tags, a full disk."""

from __future__ import annotations

import errno
import json
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TaskType, TrainingConfig, TrainingManager
from traineval.cli import main

from conftest import hide_package, iris_demo


def _train(tmp_path, model, x, y, **kwargs):
    config = TrainingConfig(
        num_epochs=1,
        batch_size=8,
        warmup_steps=0,
        progress_bar=False,
        tensorboard_logging=False,
        output_dir=str(tmp_path / "run"),
    )
    return TrainingManager(config).train(model, DataLoader(TensorDataset(x, y), 8), **kwargs)


def test_a_label_outside_the_classes(tmp_path):
    y = torch.tensor([0, 1, 2, 7, 0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"outside the model's 3 classes: .* from 0 to 7") as info:
        _train(tmp_path, nn.Linear(4, 3), torch.randn(8, 4), y)
    assert "labels must be in [0, 3)" in str(info.value)


def test_outputs_and_targets_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match=r"outputs \(8, 2\) float32, targets \(8, 3\) float32"):
        _train(
            tmp_path,
            nn.Linear(4, 2),
            torch.randn(8, 4),
            torch.randn(8, 3),
            task_type=TaskType.REGRESSION,
        )


def test_a_loss_that_returns_a_float(tmp_path):
    with pytest.raises(TypeError, match=r"returned float 1\.0; it must return a scalar tensor"):
        _train(
            tmp_path,
            nn.Linear(4, 3),
            torch.randn(8, 4),
            torch.randint(0, 3, (8,)),
            loss_function=lambda outputs, targets: 1.0,
        )


def test_a_loss_that_is_not_reduced(tmp_path):
    def per_sample(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(ValueError, match=r"per_sample returned a tensor of shape \(8,\).*mean"):
        _train(
            tmp_path,
            nn.Linear(4, 3),
            torch.randn(8, 4),
            torch.randint(0, 3, (8,)),
            loss_function=per_sample,
        )


def test_yaml_with_python_tags_is_one_line(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text('training:\n  seed: !!python/object/apply:os.system ["echo pwned"]\n')
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "evil.yaml" in err
    assert "line 2" in err
    assert "Python tags" in err


def test_a_full_disk_names_the_file_in_one_line(tmp_path, monkeypatch, capsys):
    from traineval.runs import checkpoint

    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main(iris_demo(tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "could not write" in err[0]
    assert "No space left on device" in err[0]
    assert str(tmp_path / "run" / "checkpoints") in err[0]


def _torch_zip_writer_full(obj, handle, *args, **kwargs):
    handle.write(b"PK partial")  # what torch's zip writer says when the disk fills
    raise RuntimeError(
        "[enforce fail at inline_container.cc:783] . unexpected pos 750208 vs 750096"
    )


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("targets", "replacement", "file"),
    [
        (["traineval.runs.checkpoint.torch.save"], _torch_zip_writer_full, "best.pt"),
        (
            ["safetensors.torch.save_model", "safetensors.torch.save_file"],
            _safetensors_full,
            "best.safetensors",
        ),
    ],
    ids=["torch", "safetensors"],
)
def test_a_libraries_write_error_is_one_line_naming_its_file(
    tmp_path, monkeypatch, capsys, targets, replacement, file, background
):
    # was: a 55-line SafetensorError or a 59-line "unexpected pos" RuntimeError naming no
    # file; in the background, a traceback naming best.pt when best.safetensors failed
    for target in targets:
        monkeypatch.setattr(target, replacement)
    run = tmp_path / "run"
    threaded = "training.checkpoint_writer=thread"  # the stand-ins live in this process
    assert main(iris_demo(run, f"training.async_checkpointing={str(background).lower()}",
                          threaded)) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err[:3]
    assert f"could not write '{run / 'checkpoints' / file}'" in err[0]
    assert "MB free on its disk" in err[0]
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no partial file left


def test_another_models_checkpoint_is_named_not_dumped(tmp_path, capsys):
    runs = {}
    for name, hidden in (("small", "[8]"), ("wide", "[32]")):
        runs[name] = tmp_path / name
        args = [
            "demo",
            "-q",
            "data.name=iris",
            "model.name=mlp",
            f"model.options={{hidden_sizes: {hidden}}}",
            "training.num_epochs=1",
            f"training.output_dir={runs[name]}",
        ]
        assert main(args) == 0
    other = str(runs["wide"] / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", str(runs["small"]), "--checkpoint", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "does not fit this run's model: shapes differ: net.0.weight (32, 4) vs" in err[0]
    rows = tmp_path / "rows.csv"
    names = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
    rows.write_text(",".join(names) + "\n5.1,3.5,1.4,0.2\n")
    assert main(["predict", str(runs["small"]), str(rows), "--checkpoint", other]) == 2
    assert "does not fit this run's model" in capsys.readouterr().err
    exported = str(runs["wide"] / "checkpoints" / "best.safetensors")  # weights only
    assert main(["evaluate", str(runs["small"]), "--checkpoint", exported]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "does not fit this run's model: shapes differ: net.0.weight (32, 4) vs" in err[0]
    own = str(runs["small"] / "checkpoints" / "best.safetensors")
    assert main(["evaluate", str(runs["small"]), "--checkpoint", own]) == 0


def test_a_factory_with_the_wrong_signature_is_told_the_right_one(tmp_path, capsys):
    (tmp_path / "wrong_factory.py").write_text(
        "import torch\ndef build(features, classes):\n"
        "    return torch.nn.Linear(features, classes)\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: 'wrong_factory:build'}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 2  # found beside the config, no PYTHONPATH
    err = capsys.readouterr().err
    assert "def build(input_shape, output_dim, **options) -> nn.Module" in err
    assert "missing a required argument: 'features'" in err


def test_a_package_beside_the_config_imports_without_pythonpath(tmp_path, capsys, monkeypatch):
    package = tmp_path / "beside_config_models"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\ndef build(input_shape, output_dim, hidden=8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], hidden), "
        "torch.nn.ReLU(), torch.nn.Linear(hidden, output_dim))\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: 'beside_config_models:build', options: {hidden: 4}}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder
    monkeypatch.delitem(sys.modules, "beside_config_models", raising=False)
    assert main(["fit", str(config), "-q"]) == 0
    monkeypatch.delitem(sys.modules, "beside_config_models", raising=False)
    config.write_text(config.read_text().replace("beside_config_models:build", "nowhere_pkg:build"))
    assert main(["fit", str(config), "-q", f"training.output_dir={tmp_path / 'b'}"]) == 2
    assert "cannot import 'nowhere_pkg': no module of that name" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["cv", "lr-find"])
def test_ctrl_c_during_cv_or_lr_find_is_one_line_and_exit_130(tmp_path, capsys, command):
    import os
    import signal

    from traineval import Callback, manager

    seen = []

    class CtrlCInSecondFold(Callback):
        def on_train_start(self, loop):
            seen.append(1)

        def on_step_end(self, loop):
            if (command == "lr-find" or len(seen) == 2) and loop.state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: mlp}\n"
        f"training: {{num_epochs: 2, warmup_steps: 0, output_dir: {tmp_path / 'out'}}}\n"
    )
    from traineval.training.lr_finder import RangeTest

    original = manager.TrainingManager._default_callbacks
    manager.TrainingManager._default_callbacks = lambda self: [
        *original(self),
        CtrlCInSecondFold(),
    ]
    step_end = RangeTest.on_step_end

    def interrupted_range_test(self, loop):
        if loop.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        step_end(self, loop)

    RangeTest.on_step_end = interrupted_range_test
    # Python's own Ctrl-C handler, as in a terminal: a shell's background job starts with
    # SIGINT ignored, and the signal would then never arrive
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = [command, str(config), "-q"] + (["--folds", "3"] if command == "cv" else [])
        code = main(args)
    finally:
        manager.TrainingManager._default_callbacks = original
        RangeTest.on_step_end = step_end
        signal.signal(signal.SIGINT, inherited)
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    if command == "cv":
        assert "cross-validation stopped by SIGINT; finished folds in" in err[0]
        assert "fold-1" in err[0]
    else:
        assert "lr-find stopped by SIGINT; nothing was written" in err[0]


def test_an_interrupted_fit_run_can_be_evaluated_before_it_is_resumed(tmp_path, capsys):
    import os
    import signal

    import yaml

    from traineval import Callback, manager

    class Terminate(Callback):
        def on_step_end(self, loop):
            if loop.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    original = manager.TrainingManager._default_callbacks
    manager.TrainingManager._default_callbacks = lambda self: [*original(self), Terminate()]
    try:
        args = ["demo", "-q", "data.name=iris", "model.name=mlp", "model.options={}",
                "training.num_epochs=3", "training.checkpoint_every_n_steps=2",
                f"training.output_dir={run}"]  # fmt: skip
        assert main(args) == 128 + signal.SIGTERM
    finally:
        manager.TrainingManager._default_callbacks = original
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert set(written) == {"data", "model", "training", "evaluation", "mode"}
    assert written["training"]["output_dir"] == str(run)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--checkpoint", "last"]) == 0
    assert "test metrics, checkpoint last" in capsys.readouterr().out


def test_without_matplotlib_the_numbers_are_written_and_the_extra_named(
    tmp_path, monkeypatch, capsys, caplog
):

    from traineval.reporting import plots

    run = tmp_path / "run"
    common = ["-q", "data.name=iris", "model.name=mlp", "model.options={}"]
    assert main(["demo", *common, "training.num_epochs=2", f"training.output_dir={run}"]) == 0
    hide_package(monkeypatch, "matplotlib", "matplotlib")
    monkeypatch.setattr(plots, "_warned", [])
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(["evaluate", str(run), "--plots"]) == 0
        assert main(["report", str(run)]) == 0
        config = tmp_path / "run.yaml"
        config.write_text(
            f"data: {{name: iris}}\nmodel: {{name: mlp}}\n"
            f"training: {{output_dir: {tmp_path / 'lr'}}}\n"
        )
        assert main(["lr-find", str(config), "-q", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "Suggested learning rate" in out
    assert "pip install 'traineval[plots]'" in caplog.text
    assert (run / "evaluation" / "metrics_test.json").exists()
    assert (run / "report.html").exists()
    assert (tmp_path / "lr" / "lr_find.json").exists()
    assert not (tmp_path / "lr" / "lr_find.png").exists()


def test_resuming_a_finished_run_says_so_even_when_quiet(tmp_path, capsys):
    import logging

    run = tmp_path / "run"
    args = ["demo", "-q", "data.name=iris", "model.name=mlp", "model.options={}",
            "training.num_epochs=1", f"training.output_dir={run}"]  # fmt: skip
    assert main(args) == 0
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)  # as the CLI's basicConfig does in a fresh process
    trained = json.loads((run / "summary.json").read_text())["updates_trained"]
    assert trained > 0
    capsys.readouterr()
    try:
        assert main([*args, "--resume", "auto"]) == 0
    finally:
        root.removeHandler(handler)
    said = capsys.readouterr()
    assert "already finished (step" in said.err
    # it said "Trained 1 epochs ... in 1.3s", though this command trained nothing
    assert "Nothing to train: the run had finished, 1 epoch (" in said.out
    assert "Trained" not in said.out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates_trained"] == trained  # the run's own record


def test_a_max_steps_stop_inside_an_epoch_counts_whole_epochs_and_the_batches_after(
    tmp_path, capsys
):
    """iris: 13 batches of 8 an epoch; max_steps=17 stops 4 batches into epoch 2 (it
    reported `epochs_completed: 2`). The resume to its end counts whole epochs."""
    run = tmp_path / "run"
    args = ["demo", "-q", "data.name=iris", "model.name=mlp", "model.options={}",
            "training.batch_size=8", "training.num_epochs=3", "training.warmup_steps=0",
            f"training.output_dir={run}"]  # fmt: skip
    assert main([*args, "training.max_steps=17"]) == 0
    said = capsys.readouterr().out
    assert "Trained 1 epoch and 4 batches of epoch 2 (17 optimizer updates)" in said
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["epochs_completed"], summary["batches_into_epoch"]) == (1, 4)
    assert main(["report", str(run)]) == 0
    assert "finished: 1 epoch and 4 batches of epoch 2 (17 optimizer updates)" in (
        capsys.readouterr().out
    )
    assert main([*args, "training.max_steps=null", "--resume", "auto"]) == 0
    said = capsys.readouterr().out  # it said "Trained 3 epochs", though this trained 22 updates
    assert re.search(r"Trained 22 optimizer updates in [\d.]+s, resumed at update 17: the run "
                     r"has trained 3 epochs \(39 optimizer updates\)", said)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["epochs_completed"], summary["batches_into_epoch"]) == (3, 0)


def test_a_loader_whose_batch_size_differs_from_the_configs_is_named(tmp_path, caplog):
    """The loader's batch size trains; the warning says so and which setting makes them
    agree. An equal one is silent."""
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    config = TrainingConfig(
        num_epochs=1, batch_size=8, progress_bar=False, tensorboard_logging=False,
        warmup_steps=0, output_dir=str(tmp_path / "a"),
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="traineval"):
        result = TrainingManager(config).train(
            nn.Linear(4, 2), DataLoader(TensorDataset(x, y), batch_size=16)
        )
    assert result.global_step == 2  # 32 rows in batches of 16: the loader's size trained
    assert "train_loader's batch_size=16 differs from the config's batch_size=8" in caplog.text
    assert "set batch_size=16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="traineval"):
        _train(tmp_path / "b", nn.Linear(4, 2), x, y)
    assert "batch_size" not in caplog.text


def test_a_val_loader_whose_batch_size_differs_from_eval_batch_size_is_named(tmp_path, caplog):
    """eval_batch_size=64 beside your own val loader of 8 was ignored without a word."""
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    loaders = [DataLoader(TensorDataset(x, y), batch_size=size) for size in (8, 8)]
    config = TrainingConfig(
        num_epochs=1, batch_size=8, eval_batch_size=64, progress_bar=False,
        tensorboard_logging=False, warmup_steps=0, output_dir=str(tmp_path / "a"),
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="traineval"):
        TrainingManager(config).train(nn.Linear(4, 2), *loaders)
    assert (
        "val_loader's batch_size=8 differs from the config's eval_batch_size=64: validation "
        "uses the loader's; set eval_batch_size=8"
    ) in caplog.text
    assert "train_loader" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="traineval"):  # not set: nothing to compare
        unset = config.replace(eval_batch_size=None, output_dir=str(tmp_path / "b"))
        TrainingManager(unset).train(nn.Linear(4, 2), *loaders)
    assert "batch_size" not in caplog.text


def test_a_safetensors_export_of_tied_weights_loads_into_the_run_model(tmp_path):
    """Tied weights are stored once in a safetensors export: their alias is not 'missing'."""
    from traineval.runs.checkpoint import load_model_weights, save_safetensors

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    torch.manual_seed(0)
    source, target = Tied(), Tied()
    save_safetensors(source, tmp_path / "tied.safetensors")
    load_model_weights(target, tmp_path / "tied.safetensors")
    assert torch.equal(target.out.weight, source.embed.weight)
    assert target.out.weight is target.embed.weight  # still tied
    with pytest.raises(ValueError, match=r"does not fit this run's model: .*embed\.weight"):
        load_model_weights(nn.Sequential(nn.Embedding(5, 4)), tmp_path / "tied.safetensors")


def _manager(tmp_path):
    config = TrainingConfig(
        num_epochs=1,
        warmup_steps=0,
        output_dir=str(tmp_path / "run"),
        progress_bar=False,
        tensorboard_logging=False,
        batch_size=8,
    )
    return TrainingManager(config)


def test_a_dataset_where_a_loader_belongs_is_named_from_python(tmp_path):
    # was: "outputs of shape (3,) with integer targets", blaming the loss
    data = TensorDataset(torch.randn(32, 10), torch.randint(0, 3, (32,)))
    with pytest.raises(TypeError, match=r"train_loader is a TensorDataset \(a dataset of samples"):
        _manager(tmp_path).train(nn.Linear(10, 3), data, DataLoader(data, batch_size=8))
    with pytest.raises(TypeError, match="val_loader is a TensorDataset"):
        _manager(tmp_path).train(nn.Linear(10, 3), DataLoader(data, batch_size=8), data)
    # the evaluator's was "regression outputs of shape (3,) do not match targets of shape ()"
    from traineval import Evaluator

    with pytest.raises(TypeError, match=r"loader is a TensorDataset .* DataLoader\(your_data"):
        Evaluator().evaluate_model(nn.Linear(10, 3), data)


def test_a_loader_of_single_samples_is_named_as_such(tmp_path):
    # was: "outputs of shape (3,) with integer targets: pass task_type (classification: a
    # binary classifier's one logit...", sending the user to the task
    data = TensorDataset(torch.randn(32, 10), torch.randint(0, 3, (32,)))
    said = r"targets \(\) int64\): its target is one value with no batch dimension.*batch_size"
    with pytest.raises(ValueError, match=said):
        _manager(tmp_path).train(nn.Linear(10, 3), DataLoader(data, batch_size=None))


def test_a_model_on_the_meta_device_is_refused_before_any_work(tmp_path):
    # was: torch's "Cannot copy out of meta tensor; no data!" from inside the run
    data = DataLoader(TensorDataset(torch.randn(32, 10), torch.randint(0, 3, (32,))), batch_size=8)
    with pytest.raises(ValueError, match=r"the model's 'weight' is on the meta device"):
        _manager(tmp_path).train(nn.Linear(10, 3, device="meta"), data)
    assert not (tmp_path / "run").exists()


def test_a_batch_the_first_layer_cannot_take_names_both(tmp_path):
    # was: torch's bare "mat1 and mat2 shapes cannot be multiplied (8x10 and 7x3)"
    data = DataLoader(TensorDataset(torch.randn(32, 10), torch.randint(0, 3, (32,))), batch_size=8)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"inputs \(8, 10\): its first layer '0' \(Linear\) "
                                         r"expects 7 input features"):  # fmt: skip
        _manager(tmp_path).train(model, data, data)


def test_a_batch_of_another_dtype_than_the_model_names_both(tmp_path):
    # was: torch's bare "mat1 and mat2 must have the same dtype, but got Double and Float"
    # (float64 arrays from numpy, into a float32 model)
    x = torch.from_numpy(torch.randn(32, 10).numpy().astype("float64"))
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (32,))), batch_size=8)
    said = (
        r"batch of float64 inputs: its weights are float32.*convert the data to float32 "
        r"\(x.float\(\), .*or the model to float64 \(model.double\(\)\)"
    )
    with pytest.raises(RuntimeError, match=said):
        _manager(tmp_path).train(nn.Linear(10, 3), data)
    # the other way round: the advice was the same, both halves already true
    data = DataLoader(TensorDataset(x.float(), torch.randint(0, 3, (32,))), batch_size=8)
    said = r"convert the data to float64 \(x.double\(\), .*or the model to float32 \(model.float"
    with pytest.raises(RuntimeError, match=said):
        _manager(tmp_path).train(nn.Linear(10, 3).double(), data)


class _BadRecord(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        if index == 5:
            raise ValueError("record 5: unparseable pixel value 'x7'")
        return torch.zeros(8), 0


def test_an_error_in_a_dataloader_worker_is_said_in_one_line(tmp_path):
    """torch re-raises it with the worker's whole traceback in the message: the CLI printed
    15 lines, and summary.json kept them all."""
    import json

    from traineval.training.exit_codes import error_line

    loader = torch.utils.data.DataLoader(_BadRecord(), batch_size=2, num_workers=1)
    with pytest.raises(ValueError) as caught:
        list(loader)
    assert "Original Traceback" in str(caught.value)
    said = error_line(caught.value)
    assert said == "record 5: unparseable pixel value 'x7' (in DataLoader worker process 0)"
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"), progress_bar=False, tensorboard_logging=False
    )
    with pytest.raises(ValueError):
        TrainingManager(config).train(nn.Linear(8, 2), loader)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == f"ValueError: {said}"


def _mode_evaluating_with(evaluate):
    """A user's mode: supervised steps, its own evaluation."""
    import dataclasses
    from typing import ClassVar

    from traineval.modes import Mode, ModePlan, SupervisedStep

    @dataclasses.dataclass(frozen=True)
    class OwnEvaluation(Mode):
        name: ClassVar[str] = "own_evaluation_sentences_test"

        def plan(self, ctx):
            return ModePlan(SupervisedStep(nn.CrossEntropyLoss()), evaluate=evaluate)

    return OwnEvaluation()


@pytest.mark.parametrize(
    ("evaluate", "said"),
    [
        (lambda model: 1 / 0, r"failed: ZeroDivisionError: division by zero; the training so"),
        (lambda model: {"accuracy": 0.5}, r"failed: monitor_metric='val_loss' is not among the"),
    ],
    ids=["raises", "no-monitored-metric"],
)
def test_an_evaluation_that_fails_any_way_saves_the_training_and_names_why(
    tmp_path, evaluate, said
):
    """Only a ValueError was a failed validation (the training saved in last.pt); any other
    error of a metric or a mode's evaluate(), or a monitored metric it does not give, lost
    the epoch with a bare exception."""
    from traineval.training.stop_rules import EvaluationError

    config = TrainingConfig(
        num_epochs=2, output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False
    )
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    loader = DataLoader(data, batch_size=8)
    with pytest.raises(EvaluationError, match=said):
        TrainingManager(config).train(
            nn.Linear(8, 3), loader, loader, mode=_mode_evaluating_with(evaluate)
        )
    assert (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    ("code", "said"),
    [
        ("def build(:\n", r"importing 'broken_module_\d' failed: SyntaxError: invalid syntax"),
        ("1 / 0\n", r"importing 'broken_module_\d' failed: ZeroDivisionError: division by zero"),
    ],
)
def test_a_module_whose_code_fails_on_import_is_named_with_its_field(
    tmp_path, monkeypatch, capsys, code, said
):
    """Only an ImportError was wrapped: a SyntaxError or an error at the module's top level
    printed bare (naming no field) with exit 1."""
    name = f"broken_module_{len(code) % 10}"
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.delitem(sys.modules, name, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: iris}}\nmodel: {{name: '{name}:build'}}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 2
    assert re.search(r"model\.name='broken_module_\d:build': " + said, capsys.readouterr().err)


def test_a_section_given_as_one_value_is_said_with_an_example(tmp_path, capsys):
    """'data: iris' read as "dictionary update sequence element #0 has length 1"."""
    config = tmp_path / "run.yaml"
    config.write_text("data: iris\ntraining: {num_epochs: 1}\n")
    assert main(["fit", str(config), "-q"]) == 2
    assert "section 'data' is 'iris'; it must be a mapping of its fields (e.g. data: {name:" in (
        capsys.readouterr().err
    )
    config.write_text("data: {name: iris}\n")
    assert main(["fit", str(config), "-q", "training=5"]) == 2
    assert "section 'training' is 5; it must be a mapping" in capsys.readouterr().err


def test_a_factory_that_ignores_output_dim_is_refused_before_training(
    tmp_path, capsys, monkeypatch
):
    """Iris has 3 classes and the model gave 6 scores: it trained and reported classes 3-5
    the data does not have."""
    (tmp_path / "six_outputs.py").write_text(
        "import torch\ndef build(input_shape, output_dim):\n"
        "    return torch.nn.Linear(input_shape[0], 6)\n"
    )
    monkeypatch.delitem(sys.modules, "six_outputs", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: 'six_outputs:build'}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 2
    assert (
        "model.name='six_outputs:build' built a model of 6 outputs, and the data has 3 classes"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_factory_that_fails_is_named_with_its_field(tmp_path, capsys, monkeypatch):
    """A data factory's FileNotFoundError printed the path alone; a model factory's
    RuntimeError printed torch's message alone: neither said which code failed."""
    (tmp_path / "failing_factories.py").write_text(
        "import torch\n"
        "def data():\n    open('/data/train.npy')\n"
        "def model(input_shape, output_dim, width=4):\n"
        "    return torch.nn.Linear(input_shape[0], width)\n"
    )
    monkeypatch.delitem(sys.modules, "failing_factories", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {name: custom, factory: 'failing_factories:data'}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 2
    assert "data.factory: data() failed: FileNotFoundError: [Errno 2] No such file" in (
        capsys.readouterr().err
    )
    config.write_text(
        "data: {name: iris}\nmodel: {name: 'failing_factories:model', options: {width: -4}}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["fit", str(config), "-q"]) == 2
    assert "model.name: model() failed: RuntimeError: " in capsys.readouterr().err


def test_a_last_batch_of_one_sample_under_batch_norm_says_drop_last(tmp_path):
    # was: torch's "Expected more than 1 value per channel when training, got input size
    # torch.Size([1, 8])", from inside batch norm, with no word of the loader
    data = DataLoader(TensorDataset(torch.randn(21, 4), torch.randint(0, 3, (21,))), batch_size=5)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"batch of one sample in training .*drop_last=True"):
        _manager(tmp_path).train(model, data)


def test_a_library_thread_that_fails_is_one_line_not_a_traceback(monkeypatch, capsys, caplog):
    """TensorBoard's event writer on a full disk re-raised its OSError in its own thread:
    Python printed 'Exception in thread Thread-2:' and a traceback across the command's
    one-line error."""
    import threading

    from traineval import cli

    def failing_command(args):
        def write():
            raise OSError(28, "No space left on device")

        worker = threading.Thread(target=write, name="Writer")
        worker.start()
        worker.join()
        return 0

    monkeypatch.setattr(cli, "_command", failing_command)
    before = threading.excepthook
    assert main(["report", "somewhere"]) == 0
    assert threading.excepthook is before  # put back when the command ends
    assert "Traceback" not in capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if "background thread" in r.getMessage()]
    assert said == [
        "traineval: background thread Writer (threading) ended with OSError: [Errno 28] No "
        "space left on device (--debug shows the traceback)"
    ]


def test_a_sigterm_to_flower_or_after_the_cv_folds_is_one_line_and_143(
    tmp_path, monkeypatch, capsys
):
    """Both died on SIGTERM's default action: exit 143 with nothing said (Ctrl-C was
    handled), and cv wrote no cv.json, nor said that it does not resume."""
    import os
    import signal
    import time
    from pathlib import Path

    import traineval
    from traineval import cli
    from traineval.commands import experiment

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the signal's handler acts first)

    before = signal.getsignal(signal.SIGTERM)
    demo = str(Path(traineval.__file__).parent / "configs" / "demo.yaml")
    monkeypatch.setattr(cli, "_flower", terminated)
    assert main(["flower", demo, "-q", "mode=federated"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    import re

    assert re.fullmatch(
        r"traineval: interrupted by SIGTERM; the rounds finished so far are saved in "
        r"(runs/flower-\S+)\. To continue, run the same command with --resume auto and "
        r"training\.output_dir=\1", err[0]
    ), err  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.setattr(experiment, "_test_the_folds", lambda *args: terminated())
    out = tmp_path / "cv"
    args = ["cv", demo, "--folds", "2", "-q", "data.name=iris", "model.name=mlp",
            "model.options={}", "training.num_epochs=1", f"training.output_dir={out}"]  # fmt: skip
    assert main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (
        f"traineval: cross-validation stopped by SIGTERM; finished folds in {out}: fold-1, "
        "fold-2. To continue (finished folds kept, the stopped one resumed), run the same "
        f"command with training.output_dir={out} --resume auto"
    )
    assert not (out / "evaluation" / "cv.json").exists()
    monkeypatch.undo()
    assert main([*args, "--resume", "auto"]) == 0  # both folds kept: the test phase runs
    assert (out / "evaluation" / "cv.json").exists()
    assert "nothing to resume" not in capsys.readouterr().err  # cv's folds, not runs of yours


def test_a_sigterm_after_a_run_finished_is_one_line_and_143(tmp_path, monkeypatch, capsys):
    """A SIGTERM that came after the run had written everything (while the results were
    printed) killed the process by its default action: exit -15, nothing said."""
    import json
    import os
    import signal
    import time

    from traineval import cli

    from conftest import iris_demo

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the signal's handler acts first)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_table", terminated)
    assert main(iris_demo(tmp_path / "run")) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "traineval: stopped by SIGTERM; files written before it are intact (a run's "
        "summary.json says how it ended)"
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("command", ["fit", "cv", "lr-find"])
def test_a_sigterm_before_a_run_starts_is_143_and_says_sigterm(
    tmp_path, monkeypatch, capsys, command
):
    """A SIGTERM while a command set up its run (before the run's own handling) was caught
    as a Ctrl-C: exit 130 and 'SIGINT', or 'SIGTERM' with advice about checkpoints."""
    import os
    import signal
    import time
    from pathlib import Path

    import traineval
    from traineval.commands import experiment

    built = experiment.run_parts

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the signal's handler acts first)
        return built(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_parts", terminated)
    demo = str(Path(traineval.__file__).parent / "configs" / "demo.yaml")
    args = [command, demo, "-q", "data.name=iris", "model.name=mlp", "model.options={}",
            "training.num_epochs=1", f"training.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert "SIGTERM" in err[-1], err
    assert "SIGINT" not in err[-1], err
