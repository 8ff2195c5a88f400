"""Tables as they come: an id column carried into predictions (they join back to the source
rows), columns chosen (`data.features`) or left out (`data.exclude`), and a text column
that is not declared named with the ways to declare it."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from traineval.cli import main


def _patients(path, rows=90):
    generator = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "age", "dose", "ward", "label"])
        for i in range(rows):
            age, dose = generator.normal(size=2)
            writer.writerow([f"p{i:03d}", f"{age:.4f}", f"{dose:.4f}", "north", int(age > 0)])
    return path


def _fit(tmp_path, *overrides):
    data = _patients(tmp_path / "patients.csv")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: label}}\n"
        "model: {name: mlp, options: {hidden_sizes: [8]}}\n"
        "training: {num_epochs: 2, warmup_steps: 0, tensorboard_logging: false}\n"
        "evaluation: {save_predictions: true}\n"
    )
    run = tmp_path / "run"
    return main(["fit", str(config), "-q", f"training.output_dir={run}", *overrides]), run, data


def test_an_id_column_joins_predictions_back_to_the_source_rows(tmp_path):
    status, run, data = _fit(tmp_path, "data.id_column=patient_id", "data.exclude=[ward]")
    assert status == 0
    with data.open() as handle:
        source = {row["patient_id"]: row for row in csv.DictReader(handle)}
    with (run / "evaluation" / "predictions_test.csv").open() as handle:
        predicted = list(csv.DictReader(handle))
    assert len(predicted) == 14  # 15% of 90, stratified
    for row in predicted:
        assert row["id"] in source  # joins back
        assert row["target"] == source[row["id"]]["label"]


def test_without_an_id_column_predictions_carry_the_csv_line_numbers(tmp_path):
    status, run, data = _fit(tmp_path, "data.features=[age, dose]")
    assert status == 0
    lines = data.read_text().splitlines()
    with (run / "evaluation" / "predictions_test.csv").open() as handle:
        for row in csv.DictReader(handle):
            assert lines[int(row["id"]) - 1].split(",")[-1] == row["target"]


def test_a_text_column_that_is_not_declared_names_the_ways_to_declare_it(tmp_path, capsys):
    status, _, _ = _fit(tmp_path)
    assert status == 2
    error = capsys.readouterr().err
    assert "column 'patient_id' is 'p000', not a number" in error
    assert "data.features" in error
    assert "data.exclude: [patient_id]" in error
    assert "data.id_column: patient_id" in error


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.features=[age, bmi]", "'bmi' is not a column of"),
        ("data.features=[age, label]", "data.features names ['label']"),
        ("data.exclude=ward", "data.exclude='ward' is invalid: expected a list of column names"),
    ],
)
def test_column_choices_that_cannot_be_are_refused(tmp_path, capsys, override, words):
    status, _, _ = _fit(tmp_path, "data.id_column=patient_id", override)
    assert status == 2
    assert words in capsys.readouterr().err
