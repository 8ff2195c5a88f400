"""Tables as they come: an id column carried into predictions (they join back to the source
rows), columns chosen (`data.features`) or left out (`data.exclude`), text columns encoded
on the training split (`data.categorical`, and `predict` encodes alike), and a text column
that is not declared named with the ways to declare it."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from traineval.cli import main

WARDS = ("north", "south", "east")


def _patients(path, rows=90):
    """Patients: an id, two numbers, a ward (text) that the label depends on too."""
    generator = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "age", "dose", "ward", "label"])
        for i in range(rows):
            age, dose = generator.normal(size=2)
            ward = WARDS[i % 3]
            label = int(age + (1.5 if ward == "south" else 0.0) > 0.5)
            writer.writerow([f"p{i:03d}", f"{age:.4f}", f"{dose:.4f}", ward, label])
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


def test_a_categorical_column_is_encoded_on_the_training_split_and_predict_applies_it(
    tmp_path, capsys, caplog
):
    status, run, data = _fit(
        tmp_path, "data.id_column=patient_id", "data.categorical=[ward]", "training.num_epochs=4"
    )
    assert status == 0
    with (run / "evaluation" / "predictions_test.csv").open() as handle:
        evaluated = {row["id"]: row for row in csv.DictReader(handle)}
    # the same test rows through `traineval predict`: the same encoding, the same outputs
    with data.open() as handle:
        source = [row for row in csv.DictReader(handle) if row["patient_id"] in evaluated]
    rows = tmp_path / "again.csv"
    with rows.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(source[0]))
        writer.writeheader()
        writer.writerows(source)
    out = tmp_path / "predicted.csv"
    assert main(["predict", str(run), str(rows), "--output", str(out)]) == 0
    with out.open() as handle:
        predicted = list(csv.DictReader(handle))
    assert len(predicted) == len(evaluated)
    for row in predicted:
        assert row["prediction"] == evaluated[row["patient_id"]]["prediction"]
        assert row["prob_1"] == evaluated[row["patient_id"]]["prob_1"]
    # a ward the training split never saw: none of the known ones, said once
    source[0]["ward"] = "west"
    with rows.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(source[0]))
        writer.writeheader()
        writer.writerows(source)
    with caplog.at_level("WARNING"):
        assert main(["predict", str(run), str(rows), "--output", str(out), "--overwrite"]) == 0
    assert f"1 of {len(source)} rows hold a category of ward the training split" in caplog.text


def test_the_encoding_is_learned_from_the_training_rows_only(tmp_path):
    from traineval.data import make_splits
    from traineval.data.tables import Columns, load_csv

    path = _patients(tmp_path / "p.csv")
    table = load_csv(path, "label", columns=Columns(id_column="patient_id", categorical=("ward",)))
    splits = make_splits(table, seed=0)
    assert splits.categories == {"ward": ["east", "north", "south"]}
    assert splits.feature_names == ["age", "dose", "ward=east", "ward=north", "ward=south"]
    x, _ = splits.train.tensors
    assert x.shape[1] == 5
    assert set(x[:, 2:].sum(dim=1).tolist()) == {1.0}  # each row exactly one ward
    assert x[:, :2].mean(dim=0).abs().max() < 1e-5  # the numbers standardised, not the ward


def test_predict_reads_the_run_s_data_json_not_the_training_table(tmp_path, capsys):
    """The scaling and categories are kept with the run: predict gives the same answers
    after the training CSV is gone, and a damaged data.json is named."""
    status, run, data = _fit(tmp_path, "data.id_column=patient_id", "data.categorical=[ward]")
    assert status == 0
    rows = tmp_path / "new.csv"
    rows.write_text(
        "patient_id,age,dose,ward\nq1,0.5,-0.2,south\nq2,-1.0,0.3,north\nq3,0.1,0.1,west\n"
    )
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    assert main(["predict", str(run), str(rows), "--output", str(first)]) == 0
    data.unlink()  # the training table is gone (or changed)
    assert main(["predict", str(run), str(rows), "--output", str(second)]) == 0
    assert first.read_text() == second.read_text()
    (run / "data.json").write_text('{"feature_names": ["age"]}')
    capsys.readouterr()
    assert main(["predict", str(run), str(rows), "--output", str(tmp_path / "x.csv")]) == 2
    assert "data.json' does not describe the run's table (KeyError" in capsys.readouterr().err


def test_ids_are_the_lines_of_the_file_and_follow_rows_a_mode_leaves_out(tmp_path):
    from traineval.commands.experiment import DataConfig
    from traineval.data import make_splits
    from traineval.data.tables import load_csv
    from traineval.modes import Supervised

    path = tmp_path / "gaps.csv"
    path.write_text("a,y\n1,0\n\n2,1\n" + "".join(f"{i},{i % 2}\n" for i in range(3, 41)))
    table = load_csv(path, "y")
    assert table.ids[:3] == ["2", "4", "5"]  # the blank line 3 is counted
    splits = make_splits(table, seed=0)
    data = DataConfig(name="csv", path=str(path), target="y", labeled_fraction=0.5)
    rows_before = len(splits.indices["train"])
    prepared = Supervised().prepare(splits, data)  # leaves half the training rows out
    ids = prepared.ids_of("train")
    _, y = prepared.train.tensors
    assert len(ids) == len(y) < rows_before
    lines = path.read_text().splitlines()
    for row_id, label in zip(ids, y.tolist(), strict=True):
        assert int(lines[int(row_id) - 1].split(",")[1]) == label


def test_column_lists_that_cannot_be_are_named(tmp_path):
    from traineval.commands.experiment import DataConfig

    assert DataConfig(name="csv", path="t.csv", target="y", exclude=None).exclude == ()
    with pytest.raises(ValueError, match=r"data\.categorical=\['ward', 'ward'\] is invalid: "):
        DataConfig(name="csv", path="t.csv", target="y", categorical=["ward", "ward"])


def test_data_json_is_written_when_the_run_starts_and_checked_when_read(tmp_path, capsys):
    status, run, _ = _fit(
        tmp_path, "data.id_column=patient_id", "data.exclude=[ward]", "training.max_time=0.001"
    )
    assert status == 0  # stopped at once by the time limit: data.json is there already
    import json

    record = json.loads((run / "data.json").read_text())
    assert record["feature_names"][:2] == ["age", "dose"]
    record["feature_mean"] = record["feature_mean"][:1]
    (run / "data.json").write_text(json.dumps(record))
    rows = tmp_path / "new.csv"
    rows.write_text("patient_id,age,dose,ward\nq1,0.5,-0.2,south\n")
    capsys.readouterr()
    assert main(["predict", str(run), str(rows), "--output", str(tmp_path / "x.csv")]) == 2
    assert "feature_mean holds 1 values for 2 columns" in capsys.readouterr().err


def test_target_cells_are_read_without_surrounding_spaces_and_an_empty_one_is_refused(tmp_path):
    """ "cat " and "cat" were two classes, and an empty target cell the class "" (while an
    empty feature cell is refused)."""
    from traineval.data.tables import load_csv

    rows = ["a,b,label", "1,2,cat", "3,4,cat ", "5,6, dog", "7,8,dog"]
    (tmp_path / "spaces.csv").write_text("\n".join(rows) + "\n")
    table = load_csv(tmp_path / "spaces.csv", target="label")
    assert table.class_names == ["cat", "dog"]
    assert table.y.tolist() == [0, 0, 1, 1]
    (tmp_path / "empty.csv").write_text("\n".join([*rows, "", "9,10,"]) + "\n")
    with pytest.raises(ValueError, match=r"empty.csv:7: the target is empty; fill it or drop"):
        load_csv(tmp_path / "empty.csv", target="label")


def test_cells_beyond_float32_one_class_and_non_finite_targets_are_refused_naming_them(
    tmp_path, capsys
):
    """A cell of 1e39 is finite as read but inf to the float32 model: training failed as a
    "non-finite loss" and predict wrote NaN probabilities with exit 0. One class trained to
    a loss of 0 with metrics that read its one logit as a sign; nan in a multi-column target
    surfaced as a non-finite loss."""
    from traineval.data.tables import load_csv

    rows = ["a,b,label", "1,2,cat", "3,1e39,dog", "5,6,dog"]
    (tmp_path / "huge.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"huge.csv:3: column 'b' is '1e39', beyond float32"):
        load_csv(tmp_path / "huge.csv", target="label")
    (tmp_path / "one.csv").write_text("a,label\n1,cat\n2,cat\n")
    with pytest.raises(ValueError, match=r"every target is 'cat': a classifier needs at least"):
        load_csv(tmp_path / "one.csv", target="label")
    (tmp_path / "multi.csv").write_text("a,y1,y2\n1,0.5,2\n2,nan,3\n")
    with pytest.raises(ValueError, match=r"data row 2, target column 'y1' is 'nan', not a fin"):
        load_csv(tmp_path / "multi.csv", target=["y1", "y2"])
    code, run, _ = _fit(tmp_path, "data.features=[age, dose]")
    assert code == 0
    source = (tmp_path / "patients.csv").read_text().splitlines()
    cells = source[1].split(",")
    cells[1] = "1e39"
    (tmp_path / "new.csv").write_text("\n".join([source[0], ",".join(cells)]) + "\n")
    capsys.readouterr()
    out = str(tmp_path / "x.csv")
    assert main(["predict", str(run), str(tmp_path / "new.csv"), "--output", out]) == 2
    assert "column 'age' is '1e39', beyond float32's range" in capsys.readouterr().err


def test_evaluate_refuses_a_table_changed_since_the_run_trained_on_it(tmp_path, capsys):
    """`traineval evaluate` split the table again: shuffled rows made another test split
    (accuracy 0.83 became 0.78, training rows among the test ones) without a word."""
    status, run, data = _fit(tmp_path, "data.features=[age, dose]")
    assert status == 0
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0  # the same table: evaluated
    header, *rows = data.read_text().splitlines()
    data.write_text("\n".join([header, *reversed(rows)]) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not the data this run trained on: feature_mean, feature_scale, the train" in err


def test_evaluate_refuses_a_table_whose_test_rows_changed(tmp_path, capsys):
    """Only the training split's statistics were compared: test rows edited since the run
    (the training rows as they were) were evaluated without a word, as the run's test."""
    status, run, data = _fit(tmp_path, "data.features=[age, dose]")
    assert status == 0
    with (run / "evaluation" / "predictions_test.csv").open() as handle:
        line = int(next(csv.DictReader(handle))["id"])  # a test row's CSV line number
    lines = data.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index("dose")] = str(float(cells[header.index("dose")]) + 1.5)
    lines[line - 1] = ",".join(cells)
    data.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not the data this run trained on: the test rows differ from the run's" in err


def test_predict_refuses_an_input_that_has_the_columns_it_writes(tmp_path, capsys):
    """An earlier prediction's output as input: a second `prediction` column was written,
    and that file could not be read back."""
    status, run, data = _fit(tmp_path, "data.features=[age, dose]")
    assert status == 0
    lines = data.read_text().splitlines()
    earlier = tmp_path / "earlier.csv"  # the rows with an earlier prediction beside them
    earlier.write_text("\n".join(f"{line},{'prediction' if i == 0 else 1}"
                                  for i, line in enumerate(lines)) + "\n")  # fmt: skip
    capsys.readouterr()
    again = tmp_path / "again.csv"
    assert main(["predict", str(run), str(earlier), "--output", str(again)]) == 2
    assert "has the column(s) ['prediction'], which predict writes" in capsys.readouterr().err
    assert not again.exists()


def test_a_resume_over_a_changed_table_is_refused(tmp_path, capsys):
    """The data section was compared on resume, the rows were not: a shuffled table resumed,
    trained on rows it had held out, and rewrote data.json, so evaluate then took it."""
    status, run, data = _fit(tmp_path, "data.features=[age, dose]")
    assert status == 0
    header, *rows = data.read_text().splitlines()
    data.write_text("\n".join([header, *reversed(rows)]) + "\n")
    before = (run / "data.json").read_bytes()
    capsys.readouterr()
    again = ["fit", str(tmp_path / "run.yaml"), "-q", f"training.output_dir={run}"]
    again += ["data.features=[age, dose]", "training.num_epochs=3", "--resume", "auto"]
    assert main(again) == 2  # (_fit would write the table anew)
    assert "cannot resume: the table's rows differ from the ones this run trained on" in (
        capsys.readouterr().err
    )
    assert (run / "data.json").read_bytes() == before


def _write(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_a_column_without_a_name_is_not_a_feature_unsaid(tmp_path):
    """pandas' to_csv writes its index as a column without a name: on a table sorted by its
    label, row numbers predicted noise at 0.93 (chance 0.33), without a word."""
    from traineval.data.tables import Columns, load_csv

    rows = [[i, f"{np.sin(i):.3f}", ["cat", "dog", "fish"][i // 10]] for i in range(30)]
    path = _write(tmp_path / "indexed.csv", ["", "noise", "label"], rows)
    with pytest.raises(ValueError, match=r"column 1 of the features has no name.*index=False"):
        load_csv(path, "label")
    table = load_csv(path, "label", columns=Columns(features=("noise",)))
    assert table.feature_names == ["noise"]
    # a comma ending the header (and each row) is no index: said as what it is
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("noise,label,\n" + "".join(f"{i}.5,{i % 2},\n" for i in range(30)))
    with pytest.raises(ValueError, match=r"has no name in the header row \(a comma at the end"):
        load_csv(trailing, "label")


def test_a_table_without_features_is_refused(tmp_path):
    from traineval.data.tables import Columns, load_csv

    path = _write(tmp_path / "t.csv", ["a", "label"], [[i, i % 2] for i in range(10)])
    with pytest.raises(ValueError, match="no feature columns are left"):
        load_csv(path, "label", columns=Columns(exclude=("a",)))


@pytest.mark.parametrize(("separator", "name"), [("\t", "tab"), (";", "semicolon")])
def test_a_table_separated_otherwise_is_named_so(tmp_path, separator, name):
    from traineval.data.tables import load_csv

    path = tmp_path / "t.csv"
    path.write_text(separator.join(["a", "b", "label"]) + "\n" + "1,5;2;0\n" * 3)
    with pytest.raises(ValueError, match=f"the file is {name}-separated"):
        load_csv(path, "label")
    path.write_text("a" + separator + "b\n" + "1,2,3\n")  # an in-row comma: 3 fields
    with pytest.raises(ValueError, match=f"expected 1 fields, got 3 .*{name}-separated"):
        load_csv(path, "b")


def test_long_integer_class_codes_stay_apart(tmp_path):
    """9007199254740993 and ...992 are one float64: they were merged into one class."""
    from traineval.data.tables import load_csv

    codes = ["9007199254740993", "9007199254740992", "12", "012"]
    rows = [[i, codes[i % 4]] for i in range(16)]
    table = load_csv(_write(tmp_path / "t.csv", ["a", "label"], rows), "label")
    assert table.class_names == ["12", "9007199254740992", "9007199254740993"]
    assert np.bincount(table.y).tolist() == [8, 4, 4]  # '12' and '012': one class


def test_whole_number_values_read_as_classes_are_said_to_be(tmp_path, caplog):
    """scikit-learn's diabetes target: 214 whole numbers. Read as classes (the automatic
    rule), a warning and the split's refusal name data.task=regression."""
    from sklearn.datasets import load_diabetes

    from traineval.data import make_splits
    from traineval.data.tables import load_csv

    frame = load_diabetes(as_frame=True).frame
    path = tmp_path / "diabetes.csv"
    frame.to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        table = load_csv(path, "target")
    assert "read as 214 classes; if they are values to regress, set data.task=regression" in (
        caplog.text
    )
    with pytest.raises(ValueError, match=r"214 classes are whole numbers: .*data.task=regression"):
        make_splits(table, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert load_csv(path, "target", task="regression").task_type.value == "regression"


def test_a_class_label_that_is_nan_is_named_by_its_line(tmp_path):
    from traineval.data.tables import load_csv

    rows = [[i, ["1", "2", "nan"][i % 3]] for i in range(9)]
    with pytest.raises(ValueError, match=r"t.csv:4: the target is 'nan', not a class"):
        load_csv(_write(tmp_path / "t.csv", ["a", "label"], rows), "label", task="classification")
