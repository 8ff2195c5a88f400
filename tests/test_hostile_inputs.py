"""Hostile input, as a stranger hands it over: each case ends in one stderr line that names the
culprit, exit status 2 for bad input (1 for a fault of the environment), within seconds, and
leaves every file that existed unchanged.

The table keeps each case the adversarial pass found (alias bombs, 100,000-deep nesting, a
cut-short summary or config.yaml, predictions over their own input, duplicate or non-UTF-8
CSV columns, an unwritable output directory, tune studies over bad spaces, counts or
storage). A case is (name, setup(tmp_path, trained) -> argv, the words the line must hold,
the exit status)."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from traineval.cli import main


def _table(path, rows=60, header="a,b,label"):
    generator = np.random.default_rng(0)
    x = generator.normal(size=(rows, 2))
    lines = [header] + [f"{p:.4f},{q:.4f},{int(p > 0)}" for p, q in x]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on a two-feature CSV table (the run directory, its data)."""
    return train_on_a_table(tmp_path_factory.mktemp("trained"))


def train_on_a_table(folder):
    """`fit` of a small MLP on a two-feature CSV table in `folder`: (run directory, table)."""
    data = _table(folder / "table.csv")
    config = folder / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: label}}\n"
        "model: {name: mlp, options: {hidden_sizes: [8]}}\n"
        "training: {num_epochs: 1, warmup_steps: 0, tensorboard_logging: false, "
        "progress_bar: false}\n"
    )
    run = folder / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    return run, data


def _alias_bomb(folder):
    folder.mkdir()
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 10):
        previous, current = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{current}: &{current} [" + ", ".join([f"*{previous}"] * 10) + "]")
    (folder / "config.yaml").write_text("\n".join(lines) + "\ntraining: {num_epochs: 1}\n")
    (folder / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    return folder


def _string_bomb(tmp_path):
    """A 100 KB string and 200 aliases of it: a 100 KB file that wrote a 20 MB config.yaml
    and took minutes (the bound counted values, not their text)."""
    aliases = ", ".join(["*s"] * 200)
    text = f"notes: &s {'x' * 100_000}\nmany: [{aliases}]\ntraining: {{num_epochs: 1}}\n"
    path = tmp_path / "strings.yaml"
    path.write_text(text)
    return ["fit", str(path), "-q"]


def _deep_config(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("training: {seed: " + "[" * 100_000 + "]" * 100_000 + "}\n")
    return ["fit", str(path), "-q"]


def _cut_summary(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (run / name).write_bytes((trained[0] / name).read_bytes())
    (run / "summary.json").write_text('{"best_metric": 0.9, "epochs_')
    return ["report", str(run)]


def _cut_config(tmp_path, trained, command):
    """A copy of the trained run whose config.yaml stops at a line boundary half-way."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        (run / name).write_bytes((trained[0] / name).read_bytes())
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(lines[: len(lines) // 2]))
    return [command, str(run)]


def _study(tmp_path, trained, *options, search="learning_rate: {low: 1.0e-4, high: 0.1}"):
    """`traineval tune` of a config over the trained run's table, with `search` and options."""
    config = tmp_path / "study.yaml"
    config.write_text(
        f"data: {{name: csv, path: {trained[1]}, target: label}}\n"
        "model: {name: mlp}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'study'}}}\n"
        f"search: {{{search}}}\n"
    )
    return ["tune", str(config), "-q", *options]


def _damaged_study(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.db").write_bytes(bytes(range(256)) * 20)
    return ["report", str(folder)]


def _csv_config(tmp_path, data):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: label}}\n"
        "model: {name: mlp}\n"
        f"training: {{num_epochs: 1, output_dir: {tmp_path / 'out'}}}\n"
    )
    return ["fit", str(config), "-q"]


def _latin1(tmp_path):
    data = tmp_path / "t.csv"
    data.write_bytes("a,b,label\n1,2,0\n3,4,1\ncaf\xe9,5,0\n".encode("latin-1"))
    return data


def _parquet(tmp_path):
    data = tmp_path / "t.parquet"  # a Parquet file's first bytes (pyarrow is not needed)
    data.write_bytes(b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00")
    return data


def _one_row_class(tmp_path):
    data = _table(tmp_path / "d.csv")
    with data.open("a") as handle:
        handle.write("0.5,0.5,7\n")
    return data


def _dangling(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "run")
    return link


def _resume(tmp_path, checkpoint, hidden=8):
    data = _table(tmp_path / "d.csv")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{name: csv, path: {data}, target: label}}\n"
        f"model: {{name: mlp, options: {{hidden_sizes: [{hidden}]}}}}\n"
        f"training: {{num_epochs: 3, warmup_steps: 0, output_dir: {tmp_path / 'out'}}}\n"
    )
    return ["fit", str(config), "-q", "--resume", str(checkpoint)]


def _write(path, text):
    path.write_text(text)
    return path


def _predicting(text):
    """A case's setup: `predict` of the trained run on a table holding `text`."""
    return lambda t, r: ["predict", str(r[0]), str(_write(t / "input.csv", text))]


def _link(tmp_path, target):
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    return link


def _zero_scale(tmp_path, trained):
    """A copy of the trained run whose data.json says a feature's scale is 0 (its
    predictions were NaN, exit 0)."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    schema = json.loads((run / "data.json").read_text())
    schema["feature_scale"][0] = 0.0
    (run / "data.json").write_text(json.dumps(schema))
    return ["predict", str(run), str(trained[1]), "--output", str(tmp_path / "p.csv")]


def _evaluation_is_a_file(tmp_path, trained):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "evaluation")
    (run / "evaluation").write_text("mine\n")
    return ["evaluate", str(run)]


def _evaluation_is_a_link(tmp_path, trained):
    """A copy of the trained run whose evaluation folder links elsewhere (evaluate wrote
    its files there)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "evaluation")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "metrics.json").write_text("mine\n")
    (run / "evaluation").symlink_to(tmp_path / "elsewhere")
    return ["evaluate", str(run)]


def _study_folder(tmp_path, trained, command):
    """A tune study's folder (its study.db, a trial) handed to `command`."""
    import shutil

    study = tmp_path / "study"
    study.mkdir()
    (study / "study.db").write_bytes(b"")
    shutil.copytree(trained[0], study / "trial-0000")
    return [command, str(study), *([str(trained[1])] if command == "predict" else [])]


def _events_are_a_link(tmp_path, trained):
    """A copy of the trained run whose metrics.jsonl links to a file elsewhere (evaluate
    appended its record there)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (tmp_path / "elsewhere.txt").write_text("mine\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    return ["evaluate", str(run)]


def _reordered(tmp_path, trained):
    """A copy of the trained run whose table has its columns in another order."""
    import csv
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    with trained[1].open() as handle:
        rows = list(csv.reader(handle))
    table = tmp_path / "swapped.csv"
    table.write_text("\n".join(",".join([b, a, label]) for a, b, label in rows) + "\n")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(trained[1]), str(table)))
    return ["evaluate", str(run)]


def _damaged(tmp_path, trained, *where):
    """The trained run's last.pt with the entry at `where` (a key path) removed."""
    import torch

    payload = torch.load(trained[0] / "checkpoints" / "last.pt", weights_only=True)
    record = payload
    for key in where[:-1]:
        record[key] = dict(record[key])
        record = record[key]
    del record[where[-1]]
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    return _resume(tmp_path, path)


CASES = [
    ("report of an alias bomb", lambda t, r: ["report", str(_alias_bomb(t / "bomb"))],
     "aliases expand to more than 100,000 values", 2),
    ("evaluate of an alias bomb", lambda t, r: ["evaluate", str(_alias_bomb(t / "bomb"))],
     "aliases expand to more than 100,000 values", 2),
    ("a 100,000-deep config", lambda t, r: _deep_config(t), "nests deeper than 64 levels", 2),
    ("aliases of a long string", lambda t, r: _string_bomb(t),
     "aliases expand to more than 100,000 values (or 10 MB of text)", 2),
    ("a 100,000-deep override",
     lambda t, r: [*_csv_config(t, _table(t / "x.csv")), "training.seed=" + "[" * 100_000],
     "nests deeper than 64 levels", 2),
    ("a cut-short summary.json", _cut_summary, "summary", 2),
    ("predict over its own input",
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output", str(r[1])],
     "is the input file", 2),
    ("predict from a folder", lambda t, r: ["predict", str(r[0]), str(t)],
     "is a directory: name a CSV file", 2),
    ("predict from a device", lambda t, r: ["predict", str(r[0]), "/dev/null"],
     "'/dev/null' is not a regular file (a device or a pipe): name a CSV file", 2),
    ("predict into a folder",
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output", str(t)],
     "is a directory: name a CSV file (in it)", 2),
    ("fit a folder", lambda t, r: ["fit", str(t)], "is a directory: name a YAML file", 2),
    ("predict into a folder that does not exist yet",  # it wrote a file named 'new'
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output", f"{t / 'new'}/"],
     "is a directory: name a CSV file (in it)", 2),
    ("predict over a symbolic link, with --overwrite",  # the link was replaced by a file
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output",
                   str(_link(t, _table(t / "mine.csv"))), "--overwrite"],
     "is a symbolic link: predict writes a new file and renames it", 2),
    ("predict over a device, with --overwrite",  # as root, /dev/full became a plain file
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output", "/dev/null", "--overwrite"],
     "'/dev/null' is not a regular file (a device?)", 2),
    ("predict with a number written 5_1",  # float() reads it as 51
     _predicting("a,b\n5_1,0.2\n"),
     "column 'a' is '5_1', not a finite number", 2),
    ("predict with Arabic-Indic digits",
     _predicting("a,b\n\u0665,0.2\n"),
     "column 'a' is '\u0665', not a finite number", 2),
    ("predict from an empty file",
     _predicting(""),
     "is empty: a CSV file has a header row, then data rows", 2),
    ("predict from JSON saved as .csv",
     _predicting('[{"a": 1, "b": 2}]\n'),
     "holds JSON, not CSV", 2),
    ("predict from a tab-separated file",
     _predicting("a\tb\n1\t2\n"),
     "the file is tab-separated", 2),
    ("predict with columns named in another case",
     _predicting("A,b\n1,2\n"),
     "names are read as written: 'A' for 'a'?", 2),
    ("predict with a data.json whose scale is 0", _zero_scale,
     "feature_scale holds [0.0", 2),
    ("evaluate where the run's evaluation folder is a file", _evaluation_is_a_file,
     "evaluation' is a file, not a folder: move it away", 1),
    ("evaluate of a table whose columns are in another order", _reordered,
     "has the run's columns in another order: the run read them as a, b; put them back", 2),
    ("evaluate of an empty folder", lambda t, r: ["evaluate", str(t)],
     "is not a run directory: it has no config.yaml", 2),
    ("predict over an existing file",
     lambda t, r: ["predict", str(r[0]), str(r[1]), "--output", str(_table(t / "mine.csv"))],
     "pass --overwrite", 2),
    ("a CSV with two columns of one name",
     lambda t, r: _csv_config(t, _table(t / "d.csv", header="a,a,label")),
     "the column name 'a' appears twice", 2),
    ("a latin-1 CSV to fit", lambda t, r: _csv_config(t, _latin1(t)),
     "is not UTF-8 text (byte 0xe9 on line 4): save it as UTF-8", 2),
    ("a Parquet table to fit", lambda t, r: _csv_config(t, _parquet(t)),
     "t.parquet' is a Parquet file, not CSV text: tables are read from CSV files (convert it, "
     "e.g. pandas.read_parquet(", 2),
    ("a Parquet table to predict", lambda t, r: ["predict", str(r[0]), str(_parquet(t))],
     "is a Parquet file, not CSV text", 2),
    ("a latin-1 CSV to predict", lambda t, r: ["predict", str(r[0]), str(_latin1(t))],
     "is not UTF-8 text", 2),
    ("an output folder name longer than the file system allows",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")), f"training.output_dir={t / ('x' * 300)}"],
     "a file system allows names of 255 bytes", 2),
    ("an output folder that is a dangling symbolic link",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")), f"training.output_dir={_dangling(t)}"],
     "is a symbolic link to", 2),
    ("a class of one row",
     lambda t, r: _csv_config(t, _one_row_class(t)),
     "label '7' (1 row) cannot be split: data.test_fraction=0.15 splits every class", 2),
    ("a validation split smaller than the classes",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")), "data.val_fraction=0.01"],
     "data.val_fraction=0.01 gives 1 of 51 rows to one side", 2),
    ("a batch size of 10**20",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")), "training.batch_size=" + "9" * 20],
     "batch_size=99999999999999999999 is invalid: expected an integer >= 1 and at most", 2),
    ("a NaN dropout", lambda t, r: [*_csv_config(t, _table(t / "d.csv")),
                                   "model.options.dropout=.nan"],
     "model.options.dropout=nan is invalid", 2),
    ("a layer of 10**11 units", lambda t, r: [*_csv_config(t, _table(t / "d.csv")),
                                              "model.options.hidden_sizes=[100000000000]"],
     "model.options.hidden_sizes[0]=100000000000 is invalid: expected an integer in [1, ", 2),
    ("a model larger than the machine's memory",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")),
                   "model.options.hidden_sizes=[1000000, 1000000, 1000000]"],
     "parameters: about 29,802 GiB for its weights, gradients and optimizer state, more than", 2),
    ("a misspelled model option", lambda t, r: [*_csv_config(t, _table(t / "d.csv")),
                                             "model.options.hiden_sizes=[8]"],
     "model.options.hiden_sizes is not an option of model 'mlp' (did you mean 'hidden_sizes'?)",
     2),
    ("a relative data.path that is not there",
     lambda t, r: [*_csv_config(t, _table(t / "d.csv")), "data.path=no/such.csv"],
     "data.path='no/such.csv' does not exist (a relative path is read from the working", 2),
    ("resume from another model's checkpoint",
     lambda t, r: _resume(t, r[0] / "checkpoints" / "last.pt", hidden=16),
     "does not fit this run's model: shapes differ: net.0.weight (8, 2) vs the model's (16, 2)",
     2),
    ("resume from a checkpoint without its RNG state",
     lambda t, r: _damaged(t, r, "rng", "python"), "cannot be resumed: rng.python is missing", 2),
    ("resume from a checkpoint without its loop state",
     lambda t, r: _damaged(t, r, "loop", "stopped_early"), "loop.stopped_early is missing", 2),
    ("report of a config.yaml cut at a line boundary", lambda t, r: _cut_config(t, r, "report"),
     "config.yaml' is incomplete: a run's config.yaml ends with the line", 2),
    ("evaluate of a config.yaml cut at a line boundary",
     lambda t, r: _cut_config(t, r, "evaluate"), "is incomplete", 2),
    ("evaluate of a run whose evaluation folder is a link", _evaluation_is_a_link,
     "evaluation' is a symbolic link (to ", 2),
    ("evaluate of a run whose metrics.jsonl is a link", _events_are_a_link,
     "metrics.jsonl' is a symbolic link (to ", 2),
    ("evaluate of a tune study's folder", lambda t, r: _study_folder(t, r, "evaluate"),
     "is a tune study: it has no model of its own; use one of its trials, ", 2),
    ("predict with a tune study's folder", lambda t, r: _study_folder(t, r, "predict"),
     "study/trial-0000 (`traineval report", 2),
    ("tune over a misspelled field", lambda t, r: _study(t, r, search="learnin_rate: [0.1]"),
     "search.learnin_rate is invalid: no config field of that name (did you mean", 2),
    ("tune over an inverted range",
     lambda t, r: _study(t, r, search="learning_rate: {low: 0.1, high: 1.0e-4}"),
     "search.training.learning_rate: low=0.1 must be below high=0.0001", 2),
    ("tune of 10**20 trials", lambda t, r: _study(t, r, "--trials", "9" * 20),
     "trials=99999999999999999999 is invalid: expected an integer >= 1 and at most", 2),
    ("tune with 100,000 workers", lambda t, r: _study(t, r, "--workers", "100000"),
     "workers=100000 is invalid: expected an integer in [1, ", 2),
    ("tune on a storage that cannot be opened",
     lambda t, r: _study(t, r, "--storage", f"sqlite:///{t / 'no' / 'such' / 'x.db'}"),
     "cannot be opened (OperationalError", 2),
    ("report of a study whose study.db is not a database", lambda t, r: _damaged_study(t),
     "study.db cannot be read as a study (DatabaseError", 2),
]  # fmt: skip


def _files(folder):
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("setup", "words", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input_is_one_line_naming_it(tmp_path, trained, capsys, setup, words, expected):
    argv = setup(tmp_path, trained)
    before = {**_files(tmp_path), **_files(trained[0].parent)}
    capsys.readouterr()
    started = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert status == expected  # 2: bad input; 1: the environment (disk, permissions)
    assert len(err) == 1, err[:5]
    assert words in err[0]
    assert seconds < 20  # a guard against blowing up (an alias bomb expanded takes minutes)
    after = {**_files(tmp_path), **_files(trained[0].parent)}
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed


def test_links_among_a_runs_results_are_replaced_not_written_through(tmp_path, trained):
    """A received run whose result files link elsewhere: evaluate replaces the links (a
    plot was written through its link onto the file it named)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    assert main(["evaluate", str(run), "--plots", "--save-predictions"]) == 0
    written = sorted(p.name for p in (run / "evaluation").iterdir() if p.name != "metrics.json")
    assert any(name.endswith(".png") for name in written)  # metrics.json is fit's
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    for name in written:
        (run / "evaluation" / name).unlink()
        (run / "evaluation" / name).symlink_to(victim)
    assert main(["evaluate", str(run), "--plots", "--save-predictions"]) == 0
    assert victim.read_text() == "mine\n"
    assert not any((run / "evaluation" / name).is_symlink() for name in written)


def test_a_long_text_cell_is_read_and_passed_through(tmp_path, trained):
    """A column of long texts (a cell over csv's 131,072 characters) ended predict with
    'Error: field larger than field limit (131072)'; it is passed through as it is."""
    text = "word " * 40_000
    table = tmp_path / "long.csv"
    table.write_text(f"a,b,notes\n0.1,0.2,{text}\n")
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained[0]), str(table), "--output", str(out)]) == 0
    assert text in out.read_text()


def test_tables_as_people_have_them_train(tmp_path):
    """A byte-order mark, a trailing blank line and `1`/`1.0`/`01` spellings of one label."""
    data = tmp_path / "bom.csv"
    rows = [f"{x:.3f},{-x:.3f},{label}" for x, label in zip(np.linspace(-1, 1, 60),
            ["0", "1", "1.0", "01", "0.0", "00"] * 10, strict=True)]  # fmt: skip
    data.write_text("\ufeffa,b,label\n" + "\n".join(rows) + "\n\n", encoding="utf-8")
    run = tmp_path / "out"
    assert main(_csv_config(tmp_path, data)) == 0
    from traineval.commands.experiment import RunConfig, load_data

    splits = load_data(RunConfig.from_yaml(run / "config.yaml").data)
    assert splits.feature_names == ["a", "b"]  # not '\ufeffa'
    assert splits.class_names == ["0", "1"]  # one class per number, as first written


def test_predictions_of_two_inputs_of_one_name_do_not_overwrite_each_other(tmp_path, trained):
    run, data = trained
    first, second = tmp_path / "x" / "rows.csv", tmp_path / "y" / "rows.csv"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(data.read_bytes())
    assert main(["predict", str(run), str(first)]) == 0
    assert main(["predict", str(run), str(second)]) == 0
    written = sorted((run / "predictions").glob("rows-*.csv"))
    assert len(written) == 2


def test_a_read_only_output_folder_is_one_line_of_status_1(tmp_path, trained, capsys, monkeypatch):
    """This VM runs as root, where permissions do not apply: the folder is made read-only
    by refusing, as the kernel would, every file or folder made inside it."""
    import os
    import tempfile

    locked = tmp_path / "readonly"
    locked.mkdir()
    (locked / "kept.txt").write_text("mine")

    def refused(call, where):
        def guarded(*args, **kwargs):
            target = str(where(args, kwargs))
            if target.startswith(str(locked)):
                raise PermissionError(13, "Permission denied", target)
            return call(*args, **kwargs)

        return guarded

    monkeypatch.setattr(os, "mkdir", refused(os.mkdir, lambda a, k: a[0]))
    monkeypatch.setattr(os, "open", refused(os.open, lambda a, k: a[0]))
    monkeypatch.setattr(tempfile, "mkstemp", refused(tempfile.mkstemp, lambda a, k: k.get("dir")))
    argv = [*_csv_config(tmp_path, trained[1]), f"training.output_dir={locked / 'run'}"]
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1, err[:5]
    assert len(err) == 1, err[:5]
    assert "Permission denied" in err[0]
    assert str(locked) in err[0]
    assert (locked / "kept.txt").read_text() == "mine"


def test_a_run_config_with_windows_line_endings_is_complete(tmp_path, trained):
    """Only a missing end line is a cut file: CRLF endings (git autocrlf) or no final
    newline are not."""
    from traineval.config import load_yaml

    text = (trained[0] / "config.yaml").read_text()
    crlf = tmp_path / "crlf.yaml"
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    assert load_yaml(crlf) == load_yaml(trained[0] / "config.yaml")
    bare = tmp_path / "bare.yaml"
    bare.write_text(text.rstrip("\n"))
    assert load_yaml(bare)["training"]


def test_numbers_read_as_tables_write_them():
    """float() reads '5_1' as 51 and Arabic-Indic digits as numbers; spaces around a
    number (a no-break one from a spreadsheet too) are padding, as before."""
    from traineval.data.tables import read_number

    for text, value in [("5", 5.0), (" -1.5e3 ", -1500.0), ("5\u00a0", 5.0), (".5", 0.5),
                        ("1.", 1.0), ("nan", float("nan")), ("-inf", float("-inf"))]:  # fmt: skip
        got = read_number(text)
        assert got == value or (got != got and value != value), text
    for text in ["5_1", "\u0665", "0x10", "1e", "", "1,5", "five"]:
        with pytest.raises(ValueError, match="not a number"):
            read_number(text)
