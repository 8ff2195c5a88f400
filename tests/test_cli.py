"""The command line, the demo end to end, built-in data and models."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from traineval import TaskType
from traineval.cli import main
from traineval.commands.experiment import RunConfig
from traineval.data import load_builtin, load_csv, make_splits
from traineval.models import build_model


def test_demo_end_to_end(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "-q", f"training.output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "Test metrics, best checkpoint" in out
    record = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert record["test"]["accuracy"] >= 0.95
    assert np.array(record["test_confusion_matrix"]).sum() == 270
    assert (run / "checkpoints" / "best.pt").exists()
    config = RunConfig.from_yaml(run / "config.yaml")
    assert config.model.name == "cnn"
    assert config.training.output_dir == str(run)


def test_a_config_driven_run_is_reproducible(tmp_path):
    outcomes = []
    for name in ("a", "b"):
        args = [
            "demo",
            "-q",
            "data.name=iris",
            "model.name=mlp",
            "training.num_epochs=3",
            "training.warmup_steps=2",
            "model.options={}",
            f"training.output_dir={tmp_path / name}",
        ]
        assert main(args) == 0
        outcomes.append(json.loads((tmp_path / name / "evaluation" / "metrics.json").read_text()))
    assert outcomes[0]["test"] == outcomes[1]["test"]


def test_fit_with_yaml_and_overrides_regression(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {name: diabetes}\n"
        "model: {name: mlp, options: {hidden_sizes: [32]}}\n"
        "training: {num_epochs: 5, learning_rate: 1e-2, warmup_steps: 0, "
        "early_stopping_patience: 0, tensorboard_logging: false}\n"
    )
    code = main(
        ["fit", str(path), "-q", f"training.output_dir={tmp_path / 'out'}", "training.num_epochs=3"]
    )
    assert code == 0
    record = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"loss", "mse", "mae", "rmse", "r2_score"}
    assert "Trained 3 epochs" in capsys.readouterr().out


def test_config_errors_exit_2_with_the_field_named(tmp_path, capsys):
    assert main(["demo", "training.batch_size=0"]) == 2
    assert "training: batch_size=0 is invalid" in capsys.readouterr().err
    assert main(["demo", "data.name=mnist"]) == 2
    assert "data.name='mnist' is invalid" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"path": "table.csv", "target": "label"}, "data.path='table.csv' is invalid: only "
         "data.name='csv' reads it, and data.name is 'digits' (the default name is digits)"),
        ({"name": "iris", "task": "regression"}, "data.task='regression' is invalid: only "
         "data.name='csv'"),
        ({"name": "wine", "factory": "m:f"}, "data.factory='m:f' is invalid: only "
         "data.name='custom' reads it"),
        ({"name": "custom", "factory": "m:f", "val_fraction": 0.3}, "data.val_fraction=0.3 is "
         "invalid: data.name='custom' takes the splits your factory returns as they are"),
    ],
)  # fmt: skip
def test_a_data_field_the_source_does_not_read_is_refused(data, message):
    """data: {path: table.csv, target: label} without name: csv trained the default digits,
    exit 0, even when the file did not exist; a built-in's task and a custom factory's
    split fractions were ignored the same way."""
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_dict({"data": data})


def test_a_run_of_an_earlier_version_still_loads_and_split_seed_is_read_for_custom(tmp_path):
    """The new refusals of fields a source ignores applied to run directories recorded by
    earlier versions (they trained; their record must still evaluate); and split_seed is
    read for a custom factory (labeled_fraction and the modes draw with it)."""
    import yaml

    record = {
        "data": {"name": "custom", "factory": "m:f", "val_fraction": 0.2, "split_seed": 3},
        "evaluation": {"output_dir": "elsewhere"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(record))
    loaded = RunConfig.from_run_dir(tmp_path, trust_code=True)
    assert (loaded.data.split_seed, loaded.evaluation.output_dir) == (3, None)
    custom = {"name": "custom", "factory": "m:f", "split_seed": 7}
    assert RunConfig.from_dict({"data": custom}).data.split_seed == 7


def test_the_python_evaluators_output_dir_and_a_search_section_are_named_in_a_run_config():
    with pytest.raises(ValueError, match=r"evaluation\.output_dir='elsewhere' is invalid: a "):
        RunConfig.from_dict({"evaluation": {"output_dir": "elsewhere"}})
    with pytest.raises(ValueError, match=r"search space is read by `traineval tune`"):
        RunConfig.from_dict({"search": {"learning_rate": [0.1, 0.01]}})


def test_a_built_in_model_that_answers_another_question_than_the_mode_is_refused():
    """An autoencoder in supervised mode trained its 4 reconstructions as class scores of
    3 classes and failed at the test, naming class_names; an MLP in unsupervised mode failed
    at its first batch, naming shapes."""
    with pytest.raises(ValueError, match=r"model\.name='autoencoder' is invalid: it reconstructs"):
        RunConfig.from_dict({"data": {"name": "iris"}, "model": {"name": "autoencoder"}})
    with pytest.raises(ValueError, match=r"model\.name='mlp' is invalid: mode 'unsupervised' co"):
        RunConfig.from_dict({"mode": "unsupervised", "model": {"name": "mlp"}})
    assert RunConfig.from_dict({"mode": "unsupervised", "model": {"name": "vae"}}).mode.reconstructs


def test_a_deprecated_mode_key_beside_the_modes_own_setting_is_refused():
    """training.federated_clients=5 on the command line lost silently to the file's
    mode.clients: 3, after a FutureWarning that read as if 5 were used."""
    section = {"name": "federated", "clients": 3}
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match=r"given by training\.federated_clients as 5; keep one"),
    ):
        RunConfig.from_dict({"mode": section, "training": {"federated_clients": 5}})
    with pytest.warns(FutureWarning):
        same = RunConfig.from_dict({"mode": section, "training": {"federated_clients": 3}})
    assert same.mode.clients == 3
    settings = {"mode_settings": {"federated": {"clients": 5}}}
    with pytest.raises(ValueError, match=r"given by training\.mode_settings\.federated\.clients"):
        RunConfig.from_dict({"mode": section, "training": settings})


def test_a_resume_that_changes_the_data_splits_is_refused(tmp_path, capsys):
    """data.split_seed=7 on resume was taken without a word: 11 of the 23 new test rows had
    been trained on. A setting that does not move rows (num_workers) still resumes."""
    from conftest import iris_demo

    run = tmp_path / "run"
    assert main(iris_demo(run)) == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    longer = iris_demo(run, "training.num_epochs=2", "--resume", "auto")
    for change in ("data.split_seed=7", "data.test_fraction=0.3", "data.standardize=false"):
        capsys.readouterr()
        assert main([*longer, change]) == 2
        field = change.partition("=")[0]
        assert (
            f"cannot resume: the data section changes which rows train, validate and test "
            f"({field}: the run's" in capsys.readouterr().err
        )
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert main([*longer, "data.num_workers=0"]) == 0


@pytest.mark.parametrize("command", [[], ["fit"], ["demo"], ["lr-find"]])
def test_every_command_explains_itself(command):
    out = subprocess.run(
        [sys.executable, "-m", "traineval.cli", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: traineval" in out
    assert "key=value" in out


def test_builtin_datasets_and_stratified_splits():
    for name in ("iris", "wine", "breast_cancer", "digits", "diabetes"):
        table = load_builtin(name)
        assert table.x.shape[0] == table.y.shape[0]
    splits = make_splits(load_builtin("iris"), val_fraction=0.2, test_fraction=0.2, seed=3)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [90, 30, 30]
    val_labels = splits.val.tensors[1]
    assert torch.bincount(val_labels).tolist() == [10, 10, 10]  # stratified
    x_train = splits.train.tensors[0]
    assert torch.allclose(x_train.mean(0), torch.zeros(4), atol=1e-5)  # train-only statistics
    again = make_splits(load_builtin("iris"), val_fraction=0.2, test_fraction=0.2, seed=3)
    assert torch.equal(again.val.tensors[0], splits.val.tensors[0])


def test_csv_table_with_named_target(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,kind\n1,2,cat\n3,4,dog\n5,6,cat\n")
    table = load_csv(path, "kind")
    assert table.class_names == ["cat", "dog"]
    assert table.y.tolist() == [0, 1, 0]
    assert table.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match=r"data\.target='size': 'size' is not a column"):
        load_csv(path, "size")
    path.write_text("a,y\n1,0.5\nx,1.5\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: column 'a' is 'x', not a number: a feature"):
        load_csv(path, "y")
    for cell, shown in (("nan", "'nan'"), ("", "empty"), ("inf", "'inf'")):
        path.write_text(f"a,b,y\n1,2,0.5\n3,{cell},1.5\n")
        with pytest.raises(ValueError, match=rf"t\.csv:3: column 'b' is {shown}, not a finite"):
            load_csv(path, "y")
    path.write_text("a,y\n1,0.5\n2,nan\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: the target is 'nan', not a finite number"):
        load_csv(path, "y")


def _tagged_csv(path, rows=240):
    """4 features; labels `spam`, `ham`, `eggs` (0/1) that depend on them; a float `score`."""
    generator = np.random.default_rng(0)
    x = generator.normal(size=(rows, 4))
    labels = (x @ generator.normal(size=(4, 3)) > 0).astype(int)
    lines = ["f1,f2,f3,f4,spam,ham,eggs,score"]
    for features, tags in zip(x, labels, strict=True):
        values = [f"{v:.5f}" for v in features] + [str(t) for t in tags]
        lines.append(",".join([*values, f"{features.sum():.5f}"]))
    path.write_text("\n".join(lines) + "\n")


def test_csv_target_columns_make_multilabel_or_multi_output_tables(tmp_path):
    path = tmp_path / "tags.csv"
    _tagged_csv(path, rows=6)
    table = load_csv(path, ["spam", "ham", "eggs"])
    assert table.task_type is TaskType.MULTILABEL
    assert table.class_names == ["spam", "ham", "eggs"]
    assert table.y.shape == (6, 3)
    assert table.x.shape == (6, 5)  # the other columns, score included, are features
    both = load_csv(path, ["f1", "score"])
    assert both.task_type is TaskType.REGRESSION
    assert both.num_outputs == 2
    with pytest.raises(ValueError, match=r"data.task='multilabel' but .* are not all 0/1"):
        load_csv(path, ["spam", "score"], task="multilabel")
    with pytest.raises(ValueError, match=r"data.task='classification' is invalid with 2 target"):
        load_csv(path, ["spam", "ham"], task="classification")
    with pytest.raises(ValueError, match=r"data\.target=\['spam', 'bacon'\]: 'bacon' is not"):
        load_csv(path, ["spam", "bacon"])
    with pytest.raises(ValueError, match=r"data\.target=.* expected a column name or a list"):
        RunConfig.from_dict({"data": {"name": "csv", "path": str(path), "target": ["a", "a"]}})


def test_fit_trains_and_tests_a_multilabel_csv(tmp_path, capsys):
    data = tmp_path / "tags.csv"
    _tagged_csv(data)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: [spam, ham, eggs]}}\n"
        "model: {name: mlp, options: {hidden_sizes: [32]}}\n"
        "training: {num_epochs: 30, learning_rate: 1e-2, warmup_steps: 0, "
        "early_stopping_patience: 0, tensorboard_logging: false, monitor_metric: val_f1}\n"
    )
    assert main(["fit", str(config), "-q", f"training.output_dir={tmp_path / 'out'}"]) == 0
    record = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"loss", "accuracy", "hamming_loss", "precision", "recall", "f1"}
    assert record["test"]["f1"] > 0.8  # the labels are linear in the features
    per_label = record["test_per_class"]
    assert [row["label"] for row in per_label] == ["spam", "ham", "eggs"]
    assert sum(row["support"] for row in per_label) > 0
    assert "best val_f1" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "out"), "--save-predictions"]) == 0
    printed = capsys.readouterr().out
    assert "Per class (test):" in printed
    with (tmp_path / "out" / "evaluation" / "predictions_test.csv").open() as handle:
        header = next(iter(handle)).strip()
    assert header == "id,target,prediction,prob_spam,prob_ham,prob_eggs"  # named labels
    spam = per_label[0]
    assert f"spam      {spam['precision']:.4f}  {spam['recall']:.4f}" in printed
    # evaluating the same checkpoint again logs its test once, not a second identical record
    records = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    tests = [line for line in records if '"split": "test"' in line]
    assert len(tests) == 1
    assert records[-1] == tests[0]  # in place of fit's: the record is the evaluation's


def test_builtin_models_fit_their_data_shapes():
    cnn = build_model("cnn", input_shape=(1, 8, 8), output_dim=10)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    mlp = build_model("mlp", input_shape=(1, 8, 8), output_dim=10, options={"hidden_sizes": [4]})
    assert mlp(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    auto = build_model("autoencoder", input_shape=(64,), output_dim=0)
    assert auto(torch.zeros(3, 64)).shape == (3, 64)
    with pytest.raises(ValueError, match=r"model\.name='cnn' needs image inputs"):
        build_model("cnn", input_shape=(13,), output_dim=3)
    with pytest.raises(ValueError, match=r"options\.width is not an option of model 'mlp'; its"):
        build_model("mlp", input_shape=(4,), output_dim=3, options={"width": 3})
    with pytest.raises(ValueError, match="do not fit model 'mlp'"):  # taken from the data
        build_model("mlp", input_shape=(4,), output_dim=3, options={"input_dim": 3})
    with pytest.raises(ValueError, match="cannot import 'nowhere'"):
        build_model("nowhere:factory", input_shape=(4,), output_dim=3)


def test_a_users_model_and_data_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "user_code.py").write_text(
        "import torch\n"
        "from traineval.data import load_builtin, make_splits\n"
        "def model(input_shape, output_dim):\n"
        "    return torch.nn.Linear(input_shape[0], output_dim)\n"
        "def data():\n"
        "    return make_splits(load_builtin('iris'), seed=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("user_code:model", input_shape=(4,), output_dim=3)
    assert model(torch.zeros(2, 4)).shape == (2, 3)
    code = main(
        [
            "demo",
            "-q",
            "data.name=custom",
            "data.factory=user_code:data",
            "model.name=user_code:model",
            "model.options={}",
            "training.num_epochs=2",
            "training.warmup_steps=0",
            f"training.output_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 0


def test_autoencoder_from_the_command_line(tmp_path):
    args = [
        "demo",
        "-q",
        "mode=unsupervised",
        "model.name=autoencoder",
        "model.options={latent_dim: 16}",
        "training.monitor_metric=val_r2_score",
        "training.num_epochs=5",
        f"training.output_dir={tmp_path}",
    ]
    assert main(args) == 0
    record = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"loss", "mse", "mae", "rmse", "r2_score"}
    assert record["test"]["r2_score"] > 0.3
    assert (
        main(
            [
                *args[:-2],
                "training.monitor_metric=val_accuracy",
                f"training.output_dir={tmp_path / 'b'}",
            ]
        )
        == 2
    )


def test_interrupted_cli_run_resumes_to_the_same_result(tmp_path, capsys):
    """SIGTERM mid-run: exit 143 with a resume hint; --resume auto finishes like a straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "-q",
        "data.name=iris",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=4",
        "training.warmup_steps=2",
        "training.early_stopping_patience=0",
        "training.checkpoint_every_n_steps=1",
    ]
    assert main(["demo", *common, f"training.output_dir={straight}"]) == 0

    from traineval import Callback, manager

    class Terminate(Callback):
        def on_step_end(self, loop):
            if loop.state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    original = manager.TrainingManager._default_callbacks

    def with_terminate(self):
        return [*original(self), Terminate()]

    manager.TrainingManager._default_callbacks = with_terminate
    try:
        code = main(["demo", *common, f"training.output_dir={resumed}"])
    finally:
        manager.TrainingManager._default_callbacks = original
    assert code == 128 + signal.SIGTERM
    assert f"training.output_dir={resumed} --resume auto" in capsys.readouterr().err
    assert main(["demo", *common, f"training.output_dir={resumed}", "--resume", "auto"]) == 0
    a = json.loads((straight / "evaluation" / "metrics.json").read_text())
    b = json.loads((resumed / "evaluation" / "metrics.json").read_text())
    assert a["test"] == b["test"]


def test_evaluate_keeps_the_loops_records_and_appends_while_a_run_writes(tmp_path, capsys):
    """An evaluation's record replaced the training loop's own last val record (matched by
    split and step alone), and while another process's run was training, evaluate's rewrite
    of metrics.jsonl left that run appending to the replaced file: its later records were
    lost."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    assert main(["demo", "-q", "data.name=wine", "model.name=mlp", "model.options={}",
                 "training.num_epochs=2", f"training.output_dir={run}"]) == 0  # fmt: skip
    events = run / "metrics.jsonl"
    loops = [line for line in events.read_text().splitlines() if '"checkpoint"' not in line]
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    lines = events.read_text().splitlines()
    assert [line for line in lines if '"checkpoint"' not in line] == loops  # all kept
    assert '"split": "val", "checkpoint": "best.pt"' in lines[-1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom traineval.runs.rundir import "
         "run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        inode = os.stat(events).st_ino
        assert main(["evaluate", str(run), "--split", "val"]) == 0
        assert os.stat(events).st_ino == inode  # appended to the file the run writes
        assert len(events.read_text().splitlines()) == len(lines) + 1
    finally:
        holder.kill()
        holder.wait()
    assert main(["evaluate", str(run), "--split", "val"]) == 0  # alone again: in place
    assert len(events.read_text().splitlines()) == len(lines)
    capsys.readouterr()


def test_evaluate_command_rebuilds_the_run_and_matches_fit(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "demo",
        "-q",
        "data.name=wine",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=3",
        "training.warmup_steps=2",
        f"training.output_dir={run}",
    ]
    assert main(args) == 0
    fitted = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--save-predictions", "--plots"]) == 0
    assert "test metrics, checkpoint best" in capsys.readouterr().out
    record = json.loads((run / "evaluation" / "metrics_test.json").read_text())
    assert record["metrics"] == fitted
    assert (run / "evaluation" / "predictions_test.csv").exists()
    assert (run / "evaluation" / "confusion_matrix_test.png").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the same checkpoint's test again: logged in place of fit's, not as a second record
    assert [e["split"] for e in events if e["event"] == "eval"][-2:] == ["val", "test"]
    assert [e for e in events if e.get("split") == "test"] == [events[-1]]
    assert main(["evaluate", str(run), "--checkpoint", "nope"]) == 2
    err = capsys.readouterr().err
    assert "this run has no 'nope' checkpoint" in err
    assert "it has: best, last (--checkpoint last)" in err


def test_cv_command_reports_folds_and_the_ensemble(tmp_path, capsys):
    config = tmp_path / "cv.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: mlp, options: {hidden_sizes: [16]}}\n"
        "training: {num_epochs: 3, warmup_steps: 0, early_stopping_patience: 0, "
        "learning_rate: 1e-2, tensorboard_logging: false}\n"
    )
    code = main(["cv", str(config), "--folds", "3", "-q", f"training.output_dir={tmp_path / 'o'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Cross-validation, 3 folds" in out
    assert "ensemble" in out
    summary = json.loads((tmp_path / "o" / "evaluation" / "cv.json").read_text())
    assert len(summary["folds"]) == 3
    assert {"accuracy_mean", "accuracy_std", "test_ensemble", "test_members"} <= set(summary)
    assert sum(f["validation_size"] for f in summary["folds"]) == 105 + 22  # train + val rows
    # a fold evaluates alone on the test split, as cv scored it (same checkpoint and rows);
    # its val split and the cross-validation's folder are refused, naming what to use
    fold = tmp_path / "o" / "fold-2"
    assert main(["evaluate", str(fold)]) == 0
    alone = json.loads((fold / "evaluation" / "metrics_test.json").read_text())["metrics"]
    assert alone == summary["test_members"][1]
    capsys.readouterr()
    assert main(["evaluate", str(fold), "--split", "val"]) == 2
    assert "only the test split scores it fairly" in capsys.readouterr().err
    here = os.getcwd()
    try:  # named from inside the fold
        os.chdir(fold)
        assert main(["evaluate", "."]) == 0
    finally:
        os.chdir(here)
    for command in (["evaluate"], ["predict"]):
        assert main([*command, str(tmp_path / "o"), *(["x.csv"] * (command == ["predict"]))]) == 2
        err = capsys.readouterr().err
        assert "is a cross-validation" in err
        assert (
            f"{'evaluate' if command == ['evaluate'] else 'predict with'} one of its folds" in err
        )
    from traineval import load_model

    with pytest.raises(ValueError, match=r"is a cross-validation: .* load one of its folds"):
        load_model(tmp_path / "o")
    # report of the cross-validation's folder: the tables cv printed, read from cv.json
    assert main(["cv", str(config), "--folds", "3", f"training.output_dir={tmp_path / 'p'}"]) == 0
    printed = capsys.readouterr().out
    tables = printed[printed.index("Cross-validation, 3 folds") : printed.index("Written:")]
    assert main(["report", str(tmp_path / "p")]) == 0
    assert tables in capsys.readouterr().out
    (tmp_path / "p" / "evaluation" / "cv.json").write_text('{"folds": 3}')
    assert main(["report", str(tmp_path / "p")]) == 2
    assert "does not hold a cross-validation summary" in capsys.readouterr().err


def test_a_cv_stopped_in_a_fold_resumes_to_the_uninterrupted_tables(tmp_path, capsys):
    """`traineval cv --resume auto` after a Ctrl-C in fold 2 of 3: its cv.json (the folds'
    best validation metrics, their test scores and the ensemble's) equals the uninterrupted
    cross-validation's."""
    import signal

    from traineval import Callback
    from traineval.assembly import manager

    starts = []

    class CtrlCInSecondFold(Callback):
        def on_train_start(self, loop):
            starts.append(loop.state.global_step)

        def on_step_end(self, loop):
            if len(starts) == 2 and loop.state.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)

    config = tmp_path / "cv.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: mlp}\n"
        "training: {num_epochs: 3, warmup_steps: 0, batch_size: 16, progress_bar: false}\n"
    )
    command = ["cv", str(config), "--folds", "3", "-q"]
    assert main([*command, f"training.output_dir={tmp_path / 'a'}"]) == 0
    original = manager.TrainingManager._default_callbacks
    manager.TrainingManager._default_callbacks = lambda self: [*original(self), CtrlCInSecondFold()]
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main([*command, f"training.output_dir={tmp_path / 'b'}"]) == 130
    finally:
        manager.TrainingManager._default_callbacks = original
        signal.signal(signal.SIGINT, inherited)
    assert "finished folds in" in capsys.readouterr().err
    # the stopped cross-validation's folder and its finished fold say what they are
    assert main(["report", str(tmp_path / "b")]) == 2
    assert "stopped before its end (no cv_summary.json): continue it with --resume auto" in (
        capsys.readouterr().err
    )
    assert main(["evaluate", str(tmp_path / "b" / "fold-1")]) == 2
    assert "is a fold of the cross-validation in" in capsys.readouterr().err
    assert main([*command, f"training.output_dir={tmp_path / 'b'}", "--resume", "auto"]) == 0
    tables = [json.loads((tmp_path / r / "evaluation" / "cv.json").read_text()) for r in "ab"]
    for table in tables:
        del table["output_dir"], table["folds"], table["fold_checkpoints"]
    assert tables[0] == tables[1]


def test_a_cv_resume_may_move_its_table_and_change_what_is_written():
    """The plan recorded data.path and every evaluation field: a moved table (whose values
    the plan's digest holds) or --plots refused the resume."""
    from traineval.commands.experiment import _sections_a_resume_keeps

    config = RunConfig.from_dict(
        {"data": {"name": "csv", "path": "a.csv", "target": "y"}, "model": {"name": "mlp"},
         "evaluation": {"plot_metrics": True, "save_predictions": True}}
    )  # fmt: skip
    moved = RunConfig.from_dict(
        {"data": {"name": "csv", "path": "moved/a.csv", "target": "y"}, "model": {"name": "mlp"}}
    )
    assert _sections_a_resume_keeps(config) == _sections_a_resume_keeps(moved)


def test_an_unsupervised_cv_tests_its_folds_as_fit_tests_a_run(tmp_path, capsys):
    """The folds' test ensemble scored an autoencoder's reconstructions as class scores
    ("class_names has 3 names ... for the 4 classes") after every fold had trained."""
    config = tmp_path / "cv.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: autoencoder}\nmode: {name: unsupervised}\n"
        "training: {num_epochs: 2, warmup_steps: 0, batch_size: 16, progress_bar: false}\n"
    )
    out = tmp_path / "cv"
    assert main(["cv", str(config), "--folds", "2", "-q", f"training.output_dir={out}"]) == 0
    summary = json.loads((out / "evaluation" / "cv.json").read_text())
    assert {"mse", "r2_score"} <= set(summary["test_ensemble"])
    assert main(["evaluate", str(out / "fold-1")]) == 0
    alone = json.loads((out / "fold-1" / "evaluation" / "metrics_test.json").read_text())
    assert alone["metrics"] == summary["test_members"][0]


def test_a_fold_of_a_cv_run_predicts_new_rows_with_the_cvs_scaling(tmp_path):
    """The cross-validation keeps data.json (the training rows' scaling and classes): a fold
    predicts new rows as its own run would. Reference: the fold's evaluation of the same
    (test) rows."""
    from test_predict import _rows, _species_csv
    from traineval.commands.experiment import RunConfig, load_data

    data = tmp_path / "species.csv"
    _species_csv(data)
    config = tmp_path / "cv.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: species}}\nmodel: {{name: mlp}}\n"
        "training: {num_epochs: 2, learning_rate: 1e-2, tensorboard_logging: false}\n"
    )
    out = tmp_path / "o"
    assert main(["cv", str(config), "--folds", "2", "-q", f"training.output_dir={out}"]) == 0
    assert (out / "data.json").is_file()
    fold = out / "fold-1"
    assert main(["evaluate", str(fold), "--save-predictions"]) == 0
    expected = _rows(fold / "evaluation" / "predictions_test.csv")
    source = _rows(data)
    splits = load_data(RunConfig.from_yaml(out / "config.yaml").data)
    new = tmp_path / "new.csv"
    with new.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(source[0]))
        writer.writeheader()
        writer.writerows(source[i] for i in splits.indices["test"])
    assert main(["predict", str(fold), str(new), "--output", str(tmp_path / "p.csv")]) == 0
    got = _rows(tmp_path / "p.csv")
    assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]
    for ours, theirs in zip(got, expected, strict=True):
        assert float(ours["prob_setosa"]) == pytest.approx(float(theirs["prob_setosa"]), abs=1e-6)


def test_lr_find_prints_a_suggestion_and_writes_the_curve(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {name: wine}\n"
        "model: {name: mlp, options: {hidden_sizes: [32]}}\n"
        "training: {tensorboard_logging: false, batch_size: 16}\n"
    )
    out = tmp_path / "lr"
    code = main(["lr-find", str(path), "-q", f"training.output_dir={out}", "--steps", "40"])
    assert code == 0
    printed = capsys.readouterr().out
    search = json.loads((out / "lr_find.json").read_text())
    assert len(search["losses"]) <= 40
    assert f"Suggested learning rate: {search['suggestion']:.3g}" in printed
    assert (out / "lr_find.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()  # nothing of the search's training is kept
    bad = main(["lr-find", str(path), "--min-lr", "1", "--max-lr", "0.1"])
    assert bad == 2
    assert "max_lr=0.1 is invalid: expected a finite number > min_lr=1.0" in capsys.readouterr().err


def test_bootstrap_intervals_are_printed_and_written(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {name: wine}\n"
        "model: {name: mlp, options: {hidden_sizes: [32]}}\n"
        "training: {num_epochs: 5, learning_rate: 1e-2, warmup_steps: 0, "
        "tensorboard_logging: false}\n"
        "evaluation: {bootstrap_samples: 200, confidence_level: 0.9}\n"
    )
    out = tmp_path / "out"
    assert main(["fit", str(path), "-q", f"training.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "evaluation" / "metrics.json").read_text())
    intervals = record["test_intervals"]
    assert intervals["confidence_level"] == 0.9
    assert intervals["bootstrap_samples"] == 200
    assert set(intervals["metrics"]) == {"accuracy", "precision", "recall", "f1"}
    low, high = intervals["metrics"]["accuracy"]
    assert low <= record["test"]["accuracy"] <= high
    assert "90% interval" in printed
    assert f"[{low:.4f}, {high:.4f}]" in printed
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    assert "90% interval" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"accuracy {record['test']['accuracy']:.4f} [{low:.4f}, {high:.4f}]" in report
    assert "(test intervals: 90% bootstrap, 200 resamples)" in report
    assert f"<td>[{low:.4f}, {high:.4f}]</td>" in (out / "report.html").read_text()


def test_trainings_validations_resample_nothing(quiet_config, monkeypatch):
    """bootstrap_samples resampled at every validation during training (digits, 200,000
    resamples: 0.1 s -> 0.8 s an epoch; a signal waited for it), and the intervals were
    thrown away: only a final evaluation reports them."""
    from torch.utils.data import DataLoader

    from traineval import EvaluationConfig, Evaluator, TrainingConfig, TrainingManager
    from traineval.evaluation import accumulator

    from conftest import make_classification, make_mlp

    built = []
    real = accumulator.Bootstrap
    monkeypatch.setattr(accumulator, "Bootstrap", lambda *a: built.append(a) or real(*a))
    evaluator = Evaluator(EvaluationConfig(bootstrap_samples=50))
    loader = DataLoader(make_classification(n=48), batch_size=16)
    config = TrainingConfig(num_epochs=3, **quiet_config)
    model = make_mlp()
    TrainingManager(config).train(model, loader, loader, evaluator=evaluator)
    assert built == []
    report = evaluator.evaluate(model, loader)
    assert len(built) == 1
    assert set(report.intervals) >= {"accuracy", "f1"}


def test_a_flag_that_names_a_setting_gets_the_override_to_write(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: {name: iris}\n")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", str(config), "--epochs", "5", "--batch-size", "64", "--lr", "0.1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "did you mean training.num_epochs=5 training.batch_size=64 training.learning_rate=0.1?"
        in err
    )


def test_a_number_written_as_text_is_named_as_text(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: {name: iris}\n")
    assert main(["fit", str(config), 'training.batch_size="32"']) == 2
    err = capsys.readouterr().err
    assert (
        "batch_size='32' is invalid: expected an integer >= 1; got the text '32': write 32" in err
    )


def test_help_answers_without_loading_torch():
    """`traineval --help` (and `import traineval`) load no torch: help in a tenth of a
    second instead of seconds; the public names load it when first used."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "import traineval\n"
        "from traineval.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['tune', '--help'])\n"
        "assert 'usage: traineval' in out.getvalue()\n"
        "print('torch' in sys.modules)\n"
        "from traineval import TrainingConfig, TrainingManager\n"
        "print('torch' in sys.modules, TrainingManager.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.split() == ["False", "True", "TrainingManager"], done.stderr


def test_a_run_of_code_beside_its_config_evaluates_and_predicts_from_elsewhere(
    tmp_path, monkeypatch, capsys
):
    """`fit` found `my_models` beside the config file, but the run directory did not say
    where: `traineval evaluate RUN --trust-code`, as the shipped example says, could not
    import it again (in a new process, from another working directory)."""
    import sys

    from traineval.config import code_references

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "beside_models.py").write_text(
        "import math\nimport torch\n\n"
        "def build(input_shape, output_dim, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear("
        "math.prod(input_shape), width), torch.nn.ReLU(), torch.nn.Linear(width, output_dim))\n"
    )
    config = folder / "run.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: 'beside_models:build'}\n"
        "training: {num_epochs: 1, warmup_steps: 0, tensorboard_logging: false}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(code_references, "SEARCH_PATHS", [])
    run = tmp_path / "run"
    before = list(sys.path)
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    sys.modules.pop("beside_models", None)  # as a new process
    monkeypatch.setattr(code_references, "SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", before)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--trust-code"]) == 0
    assert "accuracy" in capsys.readouterr().out
    sys.modules.pop("beside_models", None)
    assert main(["evaluate", str(run)]) == 2  # untrusted: refused, the folder not searched
    assert "--trust-code" in capsys.readouterr().err


def test_small_command_line_mistakes_are_named(tmp_path, monkeypatch, capsys):
    """Each said something false: a folder given as the config 'does not exist'; --resume
    auto without output_dir 'found no checkpoint' in a folder made new that second;
    output_dir=~/x made a folder named '~'; tune --metric accuracy blamed the search."""
    from traineval.tuning import tune

    assert main(["fit", str(tmp_path)]) == 2
    assert f"config file {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-q", "--resume", "auto"]) == 2
    assert (
        "resume_from='auto' (CLI: --resume auto) continues the run in output_dir, and "
        "output_dir is not set" in capsys.readouterr().err
    )
    assert not (tmp_path / "runs").exists()  # refused before any folder was made
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = RunConfig.from_dict({"training": {"output_dir": "~/x"}})
    assert config.training.output_dir == str(tmp_path / "home" / "x")
    search = {"learning_rate": [0.01, 0.1]}
    with pytest.raises(ValueError, match=r"metric='accuracy' is invalid: expected 'val_<metric>'"):
        tune(RunConfig.from_dict({"data": {"name": "iris"}}), search, trials=1, metric="accuracy")


def test_evaluate_takes_the_last_checkpoint_of_a_run_that_keeps_no_best(tmp_path, capsys):
    """save_best_model=false: evaluate said the run had no 'best' checkpoint, though its
    --help promised the run's final weights."""
    from conftest import iris_demo

    run = tmp_path / "run"
    assert main(iris_demo(run, "training.save_best_model=false")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert "test metrics, checkpoint last:" in capsys.readouterr().out


def test_under_torchrun_rank_0_alone_says_what_every_rank_met(tmp_path, capsys, monkeypatch):
    """Each rank printed the same refusal (and the interruption's line): rank 0 says it; a
    rank's own failure it still says."""
    from traineval.cli import _error

    config = tmp_path / "c.yaml"
    config.write_text("data: {name: digits}\ntraining: {num_epochs: -1}\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(["fit", str(config), "-q"]) == 2
        assert ("num_epochs=-1 is invalid" in capsys.readouterr().err) is says
    _error(ValueError("Expected input batch_size (3) to match target batch_size (4)."))
    assert "traineval: rank 1: error: Expected input batch_size" in capsys.readouterr().err
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # another launcher's RANK: a process alone
    _error(ValueError("its own"))
    assert "traineval: error: its own" in capsys.readouterr().err


def test_an_empty_config_file_is_refused_unless_overrides_say_something(tmp_path, capsys):
    """It trained every default, 100 epochs of digits, without a word."""
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    assert main(["fit", str(config), "-q"]) == 2
    assert "config file" in capsys.readouterr().err
    assert main(["fit", str(config), "-q", "training.num_epochs=0"]) == 2  # overrides: read
    assert "num_epochs=0 is invalid" in capsys.readouterr().err


def test_python_dash_m_traineval_is_the_command():
    """`python -m traineval` said 'No module named traineval.__main__'."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "traineval", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("traineval ")
