"""`traineval report`: built only from the run directory; checked in a real headless browser."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from traineval.cli import main
from traineval.commands.report import read_run

from conftest import hide_package


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    args = [
        "demo",
        "-q",
        "data.name=wine",
        "model.name=mlp",
        "model.options={}",
        "training.num_epochs=4",
        "training.warmup_steps=2",
        "training.early_stopping_patience=0",
        "evaluation.plot_metrics=true",
        f"training.output_dir={run}",
    ]
    assert main(args) == 0
    return run


def test_report_summarises_the_run_from_its_files(run_dir, capsys):
    (run_dir / "evaluation" / "learning_curves.png").unlink()  # rebuilt from metrics.jsonl
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "finished: 4 epochs" in out
    assert re.search(r"best val_accuracy = \d\.\d{4} at epoch \d", out)
    assert "test: loss" in out
    assert (run_dir / "evaluation" / "learning_curves.png").exists()
    page = (run_dir / "report.html").read_text()
    assert "<h2>Config</h2>" in page
    assert "<h2>Per class (test)</h2>" in page  # wine's three classes, by name
    assert all(f"<td>{name}</td>" in page for name in ("class_0", "class_1", "class_2"))
    assert "training.learning_rate" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2  # learning curves and the confusion matrix, embedded
    assert all(base64.b64decode(image)[:4] == b"\x89PNG" for image in images)
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere
    run = read_run(run_dir)
    assert run.history["epoch"] == [1, 2, 3, 4]
    assert len(run.history["val_loss"]) == 4


def test_a_run_without_its_summary_is_reported_killed_or_running(run_dir, tmp_path, capsys):
    """summary.json is written when a run ends, however it ends: without it the report said
    'finished' and 'trained None epochs, None optimizer updates'."""
    from traineval.runs.rundir import run_dir_lock

    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    (killed / "summary.json").unlink()
    assert main(["report", str(killed)]) == 0
    out = capsys.readouterr().out
    assert "not finished (no summary.json: the run was killed; --resume auto continues" in out
    page = (killed / "report.html").read_text()
    overview = page[page.index("<h2>Overview</h2>") : page.index("<h2>Metrics</h2>")]
    assert "<td>status</td><td>not finished (no summary.json" in overview
    assert "<td>trained</td><td>16 optimizer updates logged</td>" in overview
    assert "None" not in overview
    with run_dir_lock(killed):  # a run holds the folder: it is still training
        assert main(["report", str(killed)]) == 0
    assert "running (another process holds the folder now)" in capsys.readouterr().out
    resumed = tmp_path / "resumed"  # a resumed run keeps the earlier summary.json meanwhile
    shutil.copytree(run_dir, resumed)
    with run_dir_lock(resumed):
        assert main(["report", str(resumed)]) == 0
    assert "running (another process holds the folder now)" in capsys.readouterr().out
    (killed / "summary.json").write_text("[]")  # not a summary: named, not read as "killed"
    assert main(["report", str(killed)]) == 2
    assert "holds a list, not a run's summary" in capsys.readouterr().err


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    main(["report", str(run_dir)])
    shot = tmp_path / "report.png"
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1600",
    ]
    subprocess.run(
        [*command, f"--screenshot={shot}", f"file://{run_dir / 'report.html'}"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:4] == b"\x89PNG"
    assert shot.stat().st_size > 50_000  # a rendered page with plots, not a blank one
    dom = subprocess.run(
        [*command, "--dump-dom", f"file://{run_dir / 'report.html'}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count("<img") >= 2
    assert "best validation" in dom


def test_the_metrics_of_earlier_versions_still_read(run_dir):
    """Runs written before the one naming scheme (`val/accuracy`, `train/epoch_loss`,
    `epoch_lr`) rebuild the same history as today's."""
    from traineval.commands.report import history_from_events, rounds_history
    from traineval.loggers import read_jsonl

    def old(record):
        renamed = {}
        for key, value in record.items():
            if key.startswith("val_"):
                key = "val/" + key[4:]
            elif record.get("event") == "epoch" and key in ("train_loss", "learning_rate"):
                key = {"train_loss": "train/epoch_loss", "learning_rate": "epoch_lr"}[key]
            renamed[key] = value
        return renamed

    records = read_jsonl(run_dir / "metrics.jsonl")
    today = history_from_events(records)
    assert today["val_metrics"]
    assert today["train_loss"][0] is not None
    assert history_from_events([old(r) for r in records]) == today
    rounds = [
        {"event": "train", "round": 1, "step": 1, "train_loss": 0.5, "learning_rate": 0.1},
        {"event": "validation", "round": 1, "step": 1, "val_loss": 0.4, "val_accuracy": 0.9},
    ]
    earlier = [
        {"event": "train", "round": 1, "step": 1, "train/train_loss": 0.5, "lr": 0.1},
        {"event": "validation", "round": 1, "step": 1, "val/loss": 0.4, "val/accuracy": 0.9},
    ]
    assert rounds_history(earlier) == rounds_history(rounds)
    assert rounds_history(rounds)["val_metrics"] == [{"loss": 0.4, "accuracy": 0.9}]


def test_a_tampered_run_directory_injects_no_markup(run_dir, tmp_path, capsys):
    """A run directory is untrusted input: values of any type, markup in keys and values."""
    import json

    run = tmp_path / "tampered"
    shutil.copytree(run_dir, run)
    script = "<script>alert(1)</script>"
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"event": "eval", "split": "val", "step": 99, "val_x": script}))
        handle.write("\n" + json.dumps({"event": "epoch", "epoch": script, "train_loss": "x"}))
        handle.write("\n" + json.dumps({"event": "eval", "step": 100, f"val_{script}": 1.0}))
        handle.write("\n[1, 2]\n")
    summary = json.loads((run / "summary.json").read_text())
    summary.update(best_metric=script, train_seconds="soon", performance=[script])
    (run / "summary.json").write_text(json.dumps(summary))
    saved = json.loads((run / "evaluation" / "metrics.json").read_text())
    saved["test"]["accuracy"] = script
    saved["test_per_class"] = [{"label": script, "precision": script}, "junk"]
    (run / "evaluation" / "metrics.json").write_text(json.dumps(saved))
    assert main(["report", str(run)]) == 0
    assert script in capsys.readouterr().out  # the text summary prints it as text
    page = (run / "report.html").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_confusion_matrix_comes_from_the_runs_counts_and_the_config_is_folded(
    run_dir, tmp_path, capsys, monkeypatch
):
    """Without `evaluate --plots` the report draws the confusion matrix from metrics.json
    (and shows its counts as a table, also without matplotlib); the config table lists the
    settings that differ from the defaults, the others folded."""
    import json

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "evaluation" / "confusion_matrix_test.png").unlink()
    saved = json.loads((copy / "evaluation" / "metrics.json").read_text())
    counts = saved["test_confusion_matrix"]
    assert main(["report", str(copy)]) == 0
    assert (copy / "evaluation" / "confusion_matrix_test.png").exists()
    page = (copy / "report.html").read_text()
    table = page[page.index("<h2>Confusion matrix (test)</h2>") :].split("</table>")[0]
    cells = [int(c) for c in re.findall(r"<td[^>]*>(\d+)</td>", table)]
    assert cells == [c for row in counts for c in row]
    assert "<th>class_0</th>" in table

    config = page[page.index("<h2>Config</h2>") :]
    shown, _, folded = config.partition("<details>")
    assert "<td>training.num_epochs</td><td>4</td>" in shown  # the default is 100
    assert "<td>data.name</td><td>wine</td>" in shown
    assert "training.batch_size" not in shown
    assert "<td>training.batch_size</td>" in folded
    assert re.search(r"<summary>\d+ more settings, at their defaults</summary>", folded)

    (copy / "evaluation" / "confusion_matrix_test.png").unlink()
    hide_package(monkeypatch, "matplotlib", "matplotlib")
    assert main(["report", str(copy)]) == 0
    assert "Confusion matrix (test)" in (copy / "report.html").read_text()
    assert not (copy / "evaluation" / "confusion_matrix_test.png").exists()
