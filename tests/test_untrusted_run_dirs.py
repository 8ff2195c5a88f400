"""A run directory from elsewhere runs no code: its config.yaml's import paths are refused
by `evaluate` and `predict` unless the user passes --trust-code; prediction CSVs hold no
live spreadsheet formulas."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from traineval.cli import main
from traineval.commands.experiment import RunConfig
from traineval.config.code_references import UntrustedCodeError, import_object, untrusted
from traineval.evaluation.predictions import PredictionWriter
from traineval.system.csv_cells import neutralize

from conftest import iris_demo

PAYLOAD = (
    "import pathlib, torch\n"
    "pathlib.Path({marker!r}).write_text('imported')\n"
    "def model(input_shape, output_dim):\n"
    "    return torch.nn.Linear(input_shape[0], output_dim)\n"
    "def weak(batch):\n"
    "    return batch\n"
)


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "payload_mod.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("payload_mod", None)
    yield marker
    sys.modules.pop("payload_mod", None)


def _fitted_run(tmp_path, *overrides):
    run = tmp_path / "run"
    assert main(iris_demo(run, *overrides)) == 0
    return run


def _tamper(run, section, key, value):
    path = run / "config.yaml"
    data = yaml.safe_load(path.read_text())
    if isinstance(data.get(section), str):
        data[section] = {"name": data[section]}
    data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "name", "payload_mod:model"),
        ("data", "factory", "payload_mod:data"),
        ("mode", "weak_augmentation", "payload_mod:weak"),
        ("model", "options", {"inner": {"factory": "payload_mod:model"}}),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_received_run_directory_imports_nothing(
    tmp_path, payload, capsys, section, key, value, command
):
    run = _fitted_run(tmp_path)
    _tamper(run, section, key, value)
    if section == "data":
        _tamper(run, "data", "name", "custom")
    if section == "mode":
        _tamper(run, "mode", "name", "semi_supervised")
    capsys.readouterr()
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    args = [command, str(run)] + ([str(rows)] if command == "predict" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "payload_mod:" in err
    assert "--trust-code" in err
    assert "config.yaml" in err
    assert not payload.exists()  # refused before anything was imported


def test_a_gymnasium_module_id_is_code_too(tmp_path, payload):
    run = tmp_path / "rl"
    run.mkdir()
    (run / "config.yaml").write_text(
        "mode: {name: reinforcement, environment: 'payload_mod:Evil-v0'}\n"
    )
    with pytest.raises(UntrustedCodeError, match=r"mode\.environment"):
        RunConfig.from_run_dir(run)
    assert not payload.exists()


def test_imports_inside_an_untrusted_context_are_refused_by_every_route(payload):
    """Defence in depth: whatever reads the config, nothing is imported while the run
    directory is untrusted (the CLI wraps evaluate and predict in this context)."""
    from traineval.modes.envs import make_env

    with untrusted("runs/x/config.yaml"):
        with pytest.raises(UntrustedCodeError, match=r"model\.name='payload_mod:model'"):
            import_object("payload_mod:model", field="model.name")
        with pytest.raises(UntrustedCodeError, match=r"mode\.environment"):
            make_env("payload_mod:Evil-v0")
    assert not payload.exists()
    with untrusted("runs/x/config.yaml", trust_code=True):
        assert callable(import_object("payload_mod:model", field="model.name"))
    assert payload.exists()


def test_trust_code_evaluates_and_predicts_a_run_with_its_own_model(tmp_path, payload, capsys):
    run = _fitted_run(tmp_path, "model.name=payload_mod:model")  # the user's own run
    payload.unlink()
    sys.modules.pop("payload_mod")
    assert main(["evaluate", str(run)]) == 2
    assert not payload.exists()
    assert main(["evaluate", str(run), "--trust-code"]) == 0
    assert payload.exists()
    fitted = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    evaluated = json.loads((run / "evaluation" / "metrics_test.json").read_text())["metrics"]
    assert evaluated == fitted
    rows = tmp_path / "rows.csv"
    names = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
    rows.write_text(",".join(names) + "\n5.1,3.5,1.4,0.2\n")
    assert main(["predict", str(run), str(rows), "--trust-code"]) == 0


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-1.5", "-1.5"),
        ("+3", "+3"),
        ("-inf", "-inf"),
        ("cat", "cat"),
        (7, 7),
    ],
)
def test_cells_that_start_a_formula_are_neutralised(cell, written):
    assert neutralize(cell) == written


def test_prediction_files_hold_no_formulas(tmp_path):
    import torch

    from traineval import TaskType

    path = tmp_path / "p.csv"
    with PredictionWriter(path, TaskType.CLASSIFICATION, class_names=["=1+1", "-ok-"]) as out:
        out.write(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["id", "target", "prediction", "prob_=1+1", "prob_-ok-"]
    assert rows[1][1:3] == ["'=1+1", "'=1+1"]
    assert rows[2][1:3] == ["'-ok-", "'-ok-"]


def test_predict_neutralises_passed_through_cells(tmp_path, capsys):
    run = _fitted_run(tmp_path)
    names = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["=note", *names])
        writer.writerow(["=cmd|' /C calc'!A0", 5.1, 3.5, 1.4, 0.2])
        writer.writerow(["-3", 6.7, 3.0, 5.2, 2.3])
    out = tmp_path / "out.csv"
    assert main(["predict", str(run), str(rows), "--output", str(out)]) == 0
    written = list(csv.reader(out.open()))
    assert written[0][0] == "'=note"
    assert written[1][0] == "'=cmd|' /C calc'!A0"
    assert written[2][0] == "-3"
