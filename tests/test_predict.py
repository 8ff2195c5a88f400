"""`traineval predict` against the evaluator's own predictions of the same rows."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from traineval.cli import main
from traineval.commands.experiment import RunConfig, load_data


def _species_csv(path, rows=300):
    """Three numeric features on different scales and a string label (three classes)."""
    generator = np.random.default_rng(1)
    x = generator.normal(size=(rows, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -3.0]
    score = x[:, 0] + 0.05 * (x[:, 1] - 50.0) - 2.0 * (x[:, 2] + 3.0)
    kind = np.array(["setosa", "versicolor", "virginica"])[np.digitize(score, [-0.6, 0.6])]
    lines = ["sepal,petal,stem,species"]
    lines += [f"{a:.5f},{b:.5f},{c:.5f},{k}" for (a, b, c), k in zip(x, kind, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _fit_and_evaluate(
    tmp_path,
    data,
    target: str,
    training: str,
    model: str = "{name: mlp, options: {hidden_sizes: [16]}}",
):
    """Fit a run on the CSV `data` and have the evaluator write its test-split predictions;
    returns the run directory, those predictions and the test split's raw rows of `data`."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: {target}}}\n"
        f"model: {model}\n"
        f"training: {{{training}, warmup_steps: 0, tensorboard_logging: false}}\n"
    )
    run = tmp_path / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    evaluate = ["evaluate", str(run), "--split", "test", "--save-predictions", "--trust-code"]
    assert main(evaluate) == 0  # the user's own run: their config may name their code
    splits = load_data(RunConfig.from_yaml(run / "config.yaml").data)
    source = _rows(data)
    test_rows = [source[i] for i in splits.indices["test"]]
    return run, _rows(run / "evaluation" / "predictions_test.csv"), test_rows


def test_predict_equals_the_evaluators_predictions_of_the_same_rows(tmp_path, capsys):
    data = tmp_path / "species.csv"
    _species_csv(data)
    training = "num_epochs: 4, learning_rate: 1e-2"
    run, expected, test_rows = _fit_and_evaluate(tmp_path, data, "species", training)

    # the test split's raw rows, columns reordered, with an id column and the label
    new = tmp_path / "new.csv"
    with new.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stem", "id", "species", "sepal", "petal"])
        for i, row in enumerate(test_rows):
            writer.writerow([row["stem"], f"row{i}", row["species"], row["sepal"], row["petal"]])
    out = tmp_path / "scored.csv"
    capsys.readouterr()
    assert main(["predict", str(run), str(new), "--output", str(out)]) == 0
    assert f"Predicted {len(expected)} rows with best; written: {out}" in capsys.readouterr().out
    got = _rows(out)
    assert list(got[0]) == [
        "id",
        "species",
        "prediction",
        "prob_setosa",
        "prob_versicolor",
        "prob_virginica",
    ]
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours["species"] == theirs["target"]
        assert ours["prediction"] == theirs["prediction"]
        for name in ("setosa", "versicolor", "virginica"):
            assert float(ours[f"prob_{name}"]) == pytest.approx(
                float(theirs[f"prob_{name}"]), rel=1e-5
            )


FACTORY = """
import torch
from transformers.modeling_outputs import SequenceClassifierOutput


class Classifier(torch.nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )

    def forward(self, x):
        return SequenceClassifierOutput(logits=self.net(x))


def build(input_shape, output_dim):
    return Classifier(input_shape[0], output_dim)
"""


def test_predict_reads_a_hugging_face_output(tmp_path, capsys, monkeypatch):
    """A model factory whose model returns a Hugging Face ModelOutput: fit, evaluate and
    predict read its logits."""
    pytest.importorskip("transformers")
    (tmp_path / "hf_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "species.csv"
    _species_csv(data)
    training = "num_epochs: 4, learning_rate: 1e-2"
    run, expected, test_rows = _fit_and_evaluate(
        tmp_path, data, "species", training, model="{name: 'hf_factory:build'}"
    )
    new = tmp_path / "new.csv"
    with new.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sepal", "petal", "stem"])
        for row in test_rows:
            writer.writerow([row["sepal"], row["petal"], row["stem"]])
    out = tmp_path / "scored.csv"
    assert main(["predict", str(run), str(new), "--output", str(out), "--trust-code"]) == 0
    got = _rows(out)
    assert [row["prediction"] for row in got] == [row["prediction"] for row in expected]
    accuracy = np.mean([row["prediction"] == row["target"] for row in expected])
    assert accuracy > 0.6


def test_predict_names_what_is_wrong_with_the_input(tmp_path, capsys):
    data = tmp_path / "species.csv"
    _species_csv(data, rows=60)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: species}}\n"
        "model: {name: mlp}\n"
        "training: {num_epochs: 1, warmup_steps: 0, tensorboard_logging: false}\n"
    )
    run = tmp_path / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("sepal,stem\n1,2\n")
    assert main(["predict", str(run), str(bad)]) == 2
    assert "missing feature columns ['petal']" in capsys.readouterr().err
    bad.write_text("sepal,petal,stem\n1,x,2\n")
    assert main(["predict", str(run), str(bad)]) == 2
    assert "bad.csv:2: column 'petal' is 'x', not a finite number" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "none.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("target", "columns"),
    [
        ("[spam, ham, eggs]", ["prediction", "prob_spam", "prob_ham", "prob_eggs"]),
        ("[f1, score]", ["prediction_0", "prediction_1"]),
    ],
)
def test_predict_multilabel_and_multi_output_rows_like_the_evaluator(
    tmp_path, capsys, target, columns
):
    from test_cli import _tagged_csv

    data = tmp_path / "tags.csv"
    _tagged_csv(data, rows=120)
    run, expected, test_rows = _fit_and_evaluate(tmp_path, data, target, "num_epochs: 3")
    new = tmp_path / "new.csv"
    with new.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(test_rows[0]))
        writer.writeheader()
        writer.writerows(test_rows)
    out = tmp_path / "scored.csv"
    assert main(["predict", str(run), str(new), "--output", str(out)]) == 0
    got = _rows(out)
    assert list(got[0])[-len(columns) :] == columns
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        for name in columns:
            if name == "prediction":  # the predicted label set, joined by spaces
                assert ours[name] == theirs["prediction"]
            elif name.startswith("prediction_"):  # values: every digit, as the evaluator's
                assert ours[name] == theirs[name]  # (6 significant digits before)
            else:
                assert float(ours[name]) == pytest.approx(float(theirs[name]), rel=1e-5, abs=1e-6)


def test_predict_csv_options_refuse_a_bad_value_by_name():
    from traineval.commands.predict import PredictCsvOptions

    with pytest.raises(ValueError, match=r"batch_size=0 is invalid: expected an integer >= 1"):
        PredictCsvOptions(batch_size=0)
    with pytest.raises(ValueError, match=r"threshold=0 is invalid: expected a finite number > 0"):
        PredictCsvOptions(threshold=0)
    with pytest.raises(ValueError, match=r"checkpoint=5 is invalid: expected a checkpoint name"):
        PredictCsvOptions(checkpoint=5)
