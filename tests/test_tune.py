"""`traineval tune` on Optuna: trials are runs, pruning stops bad curves, the study survives
kill -9 and is shared by worker processes, bad input is refused before any trial."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from traineval.cli import main  # noqa: E402
from traineval.experiment import RunConfig  # noqa: E402
from traineval.tuning import tune  # noqa: E402
from traineval.tuning.study import open_study, prepare  # noqa: E402

SEARCH = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}, "batch_size": [16, 32]}


def _config(folder, epochs=3, **training):
    return RunConfig.from_dict(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "options": {"hidden_sizes": [32]}},
            "training": {
                "num_epochs": epochs,
                "warmup_steps": 0,
                "tensorboard_logging": False,
                "progress_bar": False,
                "monitor_metric": "val_accuracy",
                "early_stopping_patience": 0,
                "learning_rate": 3e-3,
                "output_dir": str(folder),
                **training,
            },
        }
    )


def _yaml(path, folder, epochs=3, **training):
    data = _config(folder, epochs, **training).to_dict()
    data["search"] = SEARCH
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_seeded_study_is_at_least_the_default_and_its_best_config_reproduces(tmp_path):
    result = tune(_config(tmp_path / "study"), SEARCH, trials=4)
    records = {t["number"]: t for t in result.trials}
    assert records[0]["params"] == {"training.learning_rate": 3e-3, "training.batch_size": 32}
    assert result.best_value >= records[0]["value"]  # the default config is trial 0
    assert len([t for t in result.trials if t["state"] == "complete"]) == 4
    for record in result.trials:  # each trial is a run directory like any other
        run = tmp_path / "study" / f"trial-{record['number']:04d}"
        assert (run / "config.yaml").exists()
        assert (run / "checkpoints" / "best.pt").exists()
    again = tmp_path / "again"
    assert main(["fit", str(result.best_config), "-q", f"training.output_dir={again}"]) == 0
    summary = json.loads((again / "summary.json").read_text())
    assert summary["best_metric"] == result.best_value  # exactly the best trial's


def test_a_bad_curve_is_pruned_before_its_last_epoch(tmp_path):
    config = _config(tmp_path / "study", epochs=4, batch_size=128)
    settings = prepare(config, {"learning_rate": {"low": 1e-8, "high": 1e-1, "log": True}},
                       5, None, None, "tpe", "median", None, None, None, 1, 0)  # fmt: skip
    study = open_study(settings)
    for rate in (3e-3,) * 5 + (1e-8,):  # five good curves, then one that cannot learn
        study.enqueue_trial({"training.learning_rate": rate})
    result = tune(config, {"learning_rate": {"low": 1e-8, "high": 1e-1, "log": True}}, trials=6)
    states = [t["state"] for t in result.trials]
    assert states == ["complete"] * 5 + ["pruned"]
    pruned = tmp_path / "study" / "trial-0005"
    summary = json.loads((pruned / "summary.json").read_text())
    assert summary["epochs_completed"] < 4  # stopped early, its run directory whole
    assert summary["stopped_early"] is True
    assert (pruned / "config.yaml").exists()


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({}, "search={} is invalid"),
        ({"learning_rat": {"low": 0.1, "high": 1}}, "did you mean 'training.learning_rate'"),
        ({"learning_rate": {"low": 0.1, "high": 0.01}}, "must be below high"),
        ({"learning_rate": {"low": 0, "high": 1, "log": True}}, "needs low > 0"),
        ({"batch_size": [16, 0]}, "search.training.batch_size: the value 0 is refused"),
        ({"batch_size": "big"}, "expected a list of choices"),
        ({"mode.clients": [2, 4]}, "no config field of that name"),
    ],
)
def test_a_bad_search_space_is_refused_before_any_trial(tmp_path, search, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tune(_config(tmp_path / "study"), search, trials=2)
    assert not list((tmp_path / "study").glob("trial-*"))


def test_a_metric_the_run_does_not_produce_and_a_bad_storage_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metric='val_r2_score' is not produced by this run"):
        tune(_config(tmp_path / "a"), SEARCH, trials=2, metric="val_r2_score")
    with pytest.raises(ValueError, match="cannot be opened"):
        tune(_config(tmp_path / "b"), SEARCH, trials=2, storage="sqlite:////no/such/dir/x.db")
    with pytest.raises(ValueError, match="sampler='bayes' is invalid"):
        tune(_config(tmp_path / "c"), SEARCH, trials=2, sampler="bayes")
    with pytest.raises(ValueError, match="the grid sampler needs a finite list"):
        tune(_config(tmp_path / "d"), SEARCH, trials=2, sampler="grid")


def test_the_command_prints_the_trials_and_report_reads_the_study(tmp_path, capsys):
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study", epochs=2)
    assert main(["tune", str(config), "--trials", "2", "-q", "training.num_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "trial  state" in out
    assert "Best: trial" in out
    assert (tmp_path / "study" / "best_config.yaml").exists()
    assert main(["report", str(tmp_path / "study")]) == 0
    page = (tmp_path / "study" / "report.html").read_text()
    assert "optimization history" in page
    assert "best trial curves" in page
    assert page.count("<tr>") == 3  # header + 2 trials
    assert main(["tune", str(config), "--trials", "3", "-q"]) == 0  # continues: one more
    assert "\n2  " in capsys.readouterr().out


def test_command_config_errors_exit_2(tmp_path, capsys):
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study")
    data = yaml.safe_load(config.read_text())
    data["search"] = {"nope": [1, 2]}
    config.write_text(yaml.safe_dump(data))
    assert main(["tune", str(config), "--trials", "2"]) == 1
    assert "search.nope is invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_during_a_trial_then_continue(tmp_path):
    """Finished trials are kept; the interrupted one is marked failed and retried by
    resuming its run directory, to the same result as an uninterrupted run of its params."""
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study", epochs=6,
                   checkpoint_every_n_steps=5)  # fmt: skip
    command = [sys.executable, "-m", "traineval.cli", "tune", str(config), "--trials", "3", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "study" / "trial-0001" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert subprocess.run(command, capture_output=True).returncode == 0
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/study/study.db")
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3
    assert states.count("FAIL") == 1
    killed = next(t for t in trials if t.state.name == "FAIL")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == killed.number)
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    straight = tmp_path / "straight"
    rate = killed.params["training.learning_rate"]
    batch = killed.params["training.batch_size"]
    args = ["fit", str(config), "-q", f"training.output_dir={straight}",
            f"training.learning_rate={rate!r}", f"training.batch_size={batch}"]  # fmt: skip
    data = yaml.safe_load(config.read_text())
    data.pop("search")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(data))
    args[1] = str(plain)
    assert main(args) == 0
    assert json.loads((straight / "summary.json").read_text())["best_metric"] == retry.value


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(tmp_path):
    result = tune(_config(tmp_path / "study", epochs=2), SEARCH, trials=5, workers=2, pruner="none")
    numbers = sorted(t["number"] for t in result.trials)
    assert numbers == [0, 1, 2, 3, 4]
    assert [t["state"] for t in result.trials].count("complete") == 5
    run_dirs = [t["run_dir"] for t in result.trials]
    assert len(set(run_dirs)) == 5
    for run_dir in run_dirs:
        assert (tmp_path / "study" / run_dir.rsplit("/", 1)[1] / "summary.json").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_study_report_renders_in_headless_chromium(tmp_path):
    tune(_config(tmp_path / "study", epochs=2), SEARCH, trials=3)
    assert main(["report", str(tmp_path / "study")]) == 0
    page = f"file://{tmp_path / 'study' / 'report.html'}"
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]  # fmt: skip
    dom = subprocess.run(
        [*command, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count("<img") >= 2
    assert "Trials" in dom
