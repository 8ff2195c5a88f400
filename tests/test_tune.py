"""`traineval tune` on Optuna: trials are runs, pruning stops bad curves, the study survives
kill -9 and is shared by worker processes, bad input is refused before any trial."""

from __future__ import annotations

import json
import os
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
from traineval.commands.experiment import RunConfig  # noqa: E402
from traineval.tuning import parse_space, tune  # noqa: E402
from traineval.tuning.study import TuneOptions, open_study, prepare  # noqa: E402

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
    space = {"learning_rate": {"low": 1e-8, "high": 1e-1, "log": True}}
    settings = prepare(config, space, TuneOptions(trials=5))
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
        (  # one range was silently ignored; Optuna's raw error for a range and choices
            {"learning_rate": {"low": 0.01, "high": 0.1}, "training.learning_rate": [0.2]},
            "search.training.learning_rate and search.learning_rate name one field",
        ),
        (  # the trials trained on neither value the table showed
            {"model.options.hidden_sizes": [[4]], "model.options": [{"hidden_sizes": [16]}]},
            "overlap: model.options.hidden_sizes is inside model.options",
        ),
        ({"model.options": [{"hidden_sizes": [16]}]}, "a choice is a mapping"),
        ({"output_dir": ["a", "b"]}, "training.output_dir is not searchable"),
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


def test_a_direction_against_a_built_in_metrics_is_refused(tmp_path):
    """direction='minimize' on val_accuracy would search for the worst configuration; it
    was refused only as the trials' monitor_mode, naming a field the user did not set."""
    with pytest.raises(ValueError, match="direction='minimize' is invalid: val_accuracy is"):
        tune(_config(tmp_path / "a"), SEARCH, trials=2, direction="minimize")
    with pytest.raises(ValueError, match="better when lower; use 'minimize', or leave"):
        tune(_config(tmp_path / "b"), SEARCH, trials=2, metric="val_loss", direction="maximize")
    assert not list(tmp_path.glob("*/trial-*"))


def test_a_trials_config_keeps_the_defaults_as_defaults(tmp_path):
    """Each trial's config was built from the full dict, so every field read as set: the
    default warmup_steps, shortened quietly for a run, warned once per trial."""
    from traineval.tuning.space import run_data

    config = _config(tmp_path / "s", seed=7)
    settings = prepare(config, SEARCH, TuneOptions(trials=2))
    data = run_data(settings.base, settings.written, {"training.learning_rate": 0.02})
    trial = RunConfig.from_dict(data).training
    given = config.training.given_fields | {"learning_rate", "monitor_mode"}
    assert trial.given_fields == given
    assert (
        "warmup_steps"
        not in RunConfig.from_dict(
            run_data(settings.base, ("monitor_metric",), {})
        ).training.given_fields
    )
    assert trial == config.training.replace(learning_rate=0.02, monitor_mode="max")


def test_a_model_option_left_at_its_default_is_trial_0s_and_a_typo_is_refused_first(
    tmp_path, caplog
):
    """The docs' own example (dropout searched, not set) read the unset option as None:
    'trial 0 is not the config as written'. A typo in a model option created the study
    and recorded a failed trial before it was refused."""
    search = {"model.options.dropout": {"low": 0.0, "high": 0.5, "step": 0.1}}
    with caplog.at_level("WARNING", logger="traineval"):
        result = tune(_config(tmp_path / "s", epochs=1), search, trials=1)
    assert result.trials[0]["params"] == {"model.options.dropout": 0.0}  # the mlp's default
    assert "is not the config as written" not in caplog.text
    typo = {"model.options.dropuot": [0.0, 0.2]}
    with pytest.raises(ValueError, match=r"model\.options\.dropuot is not an option of model"):
        tune(_config(tmp_path / "t", epochs=1), typo, trials=1)
    assert not (tmp_path / "t" / "study.db").exists()


def test_a_study_continues_only_under_its_metric_and_direction(tmp_path):
    """A continuation without --metric val_loss ranked val_accuracy values beside the first
    run's losses: 'Best: val_accuracy = 0.3795' was a loss, and best_config.yaml followed it."""
    tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=1, metric="val_loss")
    with pytest.raises(ValueError, match=r"optimises val_loss \(minimize\); this run asks for "):
        tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=2)
    result = tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=2, metric="val_loss")
    assert len(result.trials) == 2


def test_a_study_continues_only_with_the_config_and_space_it_began_with(tmp_path):
    """A continuation with num_epochs 1 ranked its trials beside the first run's 3-epoch
    trials, and best_config.yaml (the base with the best values) said 1 epoch for a trial
    trained 3: refitting it gave another value. Only how a run is shown may differ."""
    tune(_config(tmp_path / "s", epochs=2), SEARCH, trials=1)
    with pytest.raises(
        ValueError, match=r"training.num_epochs differ \(training.num_epochs was 2\)"
    ):
        tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=2)
    with pytest.raises(ValueError, match=r"search.training.batch_size differ"):
        tune(_config(tmp_path / "s", epochs=2), {**SEARCH, "batch_size": [8, 16]}, trials=2)
    with pytest.raises(ValueError, match=r"differ \(training.warmup_steps was not searched\)"):
        tune(_config(tmp_path / "s", epochs=2), {**SEARCH, "warmup_steps": [0, 5]}, trials=2)
    # how a run is shown or logged may differ, and a default written out is no change
    shown = _config(tmp_path / "s", epochs=2, progress_bar=True, tensorboard_logging=True)
    data = shown.to_dict()
    data["model"]["options"]["dropout"] = 0.0  # the mlp's default, now spelled out
    data["training"]["seed"] = 42  # the default seed, written out
    result = tune(RunConfig.from_dict(data), SEARCH, trials=2)
    assert len(result.trials) == 2


def test_a_study_in_a_training_runs_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    fit = tmp_path / "c.yaml"
    fit.write_text(yaml.safe_dump(_config(run, epochs=1).to_dict()))
    assert main(["fit", str(fit), "-q"]) == 0
    with pytest.raises(ValueError, match="holds a training run"):
        tune(_config(run, epochs=1), SEARCH, trials=1)
    assert not (run / "study.db").exists()


def test_a_trial_whose_values_are_refused_fails_and_the_study_goes_on(tmp_path, monkeypatch):
    """A model factory refusing one value ended the whole study (exit 2, no table), and the
    rerun drew another grid point in its place; it is that trial's failure, as a diverging
    trial's is. The same refusal three times in a row (a mistake in the config, not in a
    value) stops the study naming it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pickymodels", raising=False)
    (tmp_path / "pickymodels.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "def build(input_shape, output_dim, width=32):\n"
        "    if width == 8:\n"
        "        raise ValueError('width 8 is too small for this data')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),\n"
        "                         nn.ReLU(), nn.Linear(width, output_dim))\n\n"
        "def never(input_shape, output_dim, width=32):\n"
        "    raise ValueError('no model today')\n"
    )

    def config(folder, factory):
        data = _config(folder, epochs=1).to_dict()
        data["model"] = {"name": f"pickymodels:{factory}", "options": {"width": 32}}
        return RunConfig.from_dict(data)

    search = {"model.options.width": [32, 8, 16]}
    result = tune(config(tmp_path / "g", "build"), search, trials=3, sampler="grid")
    states = {t["params"]["model.options.width"]: t["state"] for t in result.trials}
    assert states == {32: "complete", 8: "fail", 16: "complete"}
    failed = [t for t in result.trials if t["state"] == "fail"]
    assert "width 8 is too small" in failed[0]["error"]
    again = tune(config(tmp_path / "g", "build"), search, trials=3, sampler="grid")
    assert len(again.trials) == 3  # nothing drawn twice
    with pytest.raises(ValueError, match=r"3 trials in a row failed the same way: .*no model"):
        tune(config(tmp_path / "h", "never"), {"model.options.width": [16, 32]}, trials=4)


def test_a_running_trial_whose_process_died_before_its_run_began_is_retried(tmp_path):
    """A trial asked for, then its process killed before its run directory was recorded,
    stayed 'running' forever and the study ended short of its trials."""
    from traineval.tuning.trial import next_trial

    config = _config(tmp_path / "s", epochs=1)
    settings = prepare(config, SEARCH, TuneOptions(trials=2))
    study = open_study(settings)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    trial = next_trial(study, 2, settings.study_dir)
    trial.set_user_attr("pid", int(dead.stdout))  # as if that process had asked
    result = tune(config, SEARCH, trials=2)
    finished = [t for t in result.trials if t["state"] == "complete"]
    assert len(finished) == 2
    assert not [t for t in result.trials if t["state"] == "running"]


def test_the_study_says_its_start_and_each_trial_once_in_its_own_words(tmp_path, caplog):
    """Optuna's own "A new study created in RDB" and "Using an existing study" lines came
    beside ours, in another format; a trial's line read "finished: 0.8695652173913043"."""
    import logging

    heard: list[logging.LogRecord] = []
    optuna_log = logging.getLogger("optuna")
    listener = logging.Handler(logging.DEBUG)
    listener.emit = heard.append  # type: ignore[method-assign]
    optuna_log.addHandler(listener)
    try:
        with caplog.at_level("INFO", logger="traineval"):
            tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=1)
            tune(_config(tmp_path / "s", epochs=1), SEARCH, trials=2)
    finally:
        optuna_log.removeHandler(listener)
    assert [r.getMessage() for r in heard if r.levelno < logging.WARNING] == []
    said = [r.getMessage() for r in caplog.records if r.name.startswith("traineval.tuning")]
    assert "study 's' created" in said
    assert "study 's' continues after its 1 finished trial" in said
    finished = [line for line in said if " finished: " in line]
    assert len(finished) == 2
    value = r"0\.\d{1,4}"
    assert re.fullmatch(rf"trial 0 finished: val_accuracy = {value} \(best: trial 0, {value}\)",
                        finished[0])  # fmt: skip


def test_a_grid_study_asked_for_more_trials_runs_the_grid_once(tmp_path, caplog):
    """--sampler grid with more trials than combinations (the default 20) failed after the
    last one: Optuna's grid sampler called study.stop() outside optimize()."""
    search = {"batch_size": [16, 32]}
    with caplog.at_level("WARNING", logger="traineval"):
        result = tune(_config(tmp_path / "g", epochs=1), search, trials=20, sampler="grid")
    assert sorted(t["params"]["training.batch_size"] for t in result.trials) == [16, 32]
    assert "the grid holds 2 combinations: the study runs 2 trials, not 20" in caplog.text
    assert result.best_config.exists()


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
    (tmp_path / "study" / "study.db").rename(tmp_path / "elsewhere.db")  # a storage elsewhere
    assert main(["report", str(tmp_path / "study")]) == 2
    assert "holds a study's trials but not its study.db" in capsys.readouterr().err


def test_command_config_errors_exit_2(tmp_path, capsys):
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study")
    data = yaml.safe_load(config.read_text())
    data["search"] = {"nope": [1, 2]}
    config.write_text(yaml.safe_dump(data))
    assert main(["tune", str(config), "--trials", "2"]) == 2
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


def _distinct(result):
    return {tuple(sorted(t["params"].items())) for t in result.trials}


def test_a_continued_random_study_draws_no_parameters_twice(tmp_path):
    """Each trial samples with its own seed (the study's seed and the trial's number): the
    continuation does not replay the first run's draws."""
    config = _config(tmp_path / "study", epochs=1)
    space = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}}
    tune(config, space, trials=3, sampler="random", pruner="none")
    result = tune(config, space, trials=6, sampler="random", pruner="none")
    assert len(result.trials) == 6
    assert len(_distinct(result)) == 6


def test_a_place_held_by_another_machine_keeps_the_count_exact(tmp_path):
    """A trial running elsewhere (here: asked and left running) holds one of the N places:
    this process runs N - 1, and the study ends with N once the other one finishes."""
    config = _config(tmp_path / "study", epochs=1)
    space = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}}
    settings = prepare(config, space, TuneOptions(trials=3, sampler="random", pruner="none"))
    elsewhere = open_study(settings).ask({"training.learning_rate": optuna.distributions.
                                          FloatDistribution(1e-3, 3e-2, log=True)})  # fmt: skip
    result = tune(config, space, trials=3, sampler="random", pruner="none")
    states = sorted(t["state"] for t in result.trials)
    assert states == ["complete", "complete", "running"]
    open_study(settings).tell(elsewhere, 0.5)
    assert tune(config, space, trials=3, sampler="random").trials[0]["state"] == "complete"
    study = open_study(settings)
    assert [t.state.name for t in study.get_trials()].count("COMPLETE") == 3


def test_trial_0_outside_the_space_is_said_and_stepped_values_read_as_written(tmp_path, caplog):
    space = {"learning_rate": {"low": 0.01, "high": 0.05}, "weight_decay": [0.0, 0.1]}
    with caplog.at_level("WARNING"):
        result = tune(_config(tmp_path / "study", epochs=1), space, trials=1, pruner="none")
    assert "trial 0 is not the config as written: training.learning_rate=0.003 lies outside " \
        "the search space (0.01 to 0.05)" in caplog.text  # fmt: skip
    assert 0.01 <= result.trials[0]["params"]["training.learning_rate"] <= 0.05
    stepped = parse_space({"weight_decay": {"low": 0.0, "high": 0.5, "step": 0.1}},
                          _config(tmp_path).to_dict())[0]  # fmt: skip
    assert stepped.grid() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    fixed = optuna.trial.FixedTrial({"training.weight_decay": 0.1 * 3})
    assert stepped.tidy(stepped.suggest(fixed)) == 0.3
    assert not stepped.holds(0.01)  # the config's 0.01 is not a step: trial 0 is sampled


def _tune_command(config, *args):
    return [sys.executable, "-m", "traineval.cli", "tune", str(config), "-q", *args]


def _wait_for(path, process, seconds=300):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def _trials(folder, name="study"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/study.db")
    return study.get_trials()


def _straight_value(tmp_path, config, trial):
    """The best metric of an uninterrupted `fit` with `trial`'s parameters."""
    data = yaml.safe_load(config.read_text())
    data.pop("search")
    data["training"].update({k.removeprefix("training."): v for k, v in trial.params.items()})
    data["training"]["output_dir"] = str(tmp_path / "straight")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(data))
    assert main(["fit", str(plain), "-q"]) == 0
    return json.loads((tmp_path / "straight" / "summary.json").read_text())["best_metric"]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()  # a zombie has stopped
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigterm_during_a_trial_records_it_interrupted_and_the_next_run_resumes_it(tmp_path):
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study", epochs=6,
                   checkpoint_every_n_steps=5)  # fmt: skip
    command = _tune_command(config, "--trials", "3")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "study" / "trial-0001" / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    last = err.strip().splitlines()[-1]
    assert last.startswith("traineval: tune interrupted: trial 1 stopped (training interrupted")
    assert "run the same command to continue" in last
    assert "Traceback" not in err
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "trial 4 resumes the interrupted run" not in again.stderr  # the retry is trial 3
    assert "resumes the interrupted run in" in again.stderr
    trials = _trials(tmp_path / "study")
    stopped = next(t for t in trials if "interrupted" in t.user_attrs)
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == stopped.number)
    assert retry.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    assert _straight_value(tmp_path, config, stopped) == retry.value  # resumed, exactly


@pytest.mark.slow
def test_a_killed_driver_takes_its_workers_and_the_rerun_ends_with_exactly_n(tmp_path):
    config = _yaml(tmp_path / "tune.yaml", tmp_path / "study", epochs=8,
                   checkpoint_every_n_steps=5)  # fmt: skip
    command = _tune_command(config, "--trials", "6", "--workers", "2", "--pruner", "none")
    with open(tmp_path / "stderr.txt", "w") as stderr:  # the workers and tracker write too
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_for(tmp_path / "study" / "trial-0001" / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    pids = {t.user_attrs["pid"] for t in _trials(tmp_path / "study") if "pid" in t.user_attrs}
    deadline = time.time() + 60
    while any(map(_alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), "the workers outlived their driver"
    time.sleep(1)  # the resource tracker's last words, were there any
    assert "leaked" not in (tmp_path / "stderr.txt").read_text()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    states = [t.state.name for t in _trials(tmp_path / "study") if "surplus" not in t.user_attrs]
    assert states.count("COMPLETE") == 6


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_its_trial_resumes(tmp_path):
    # On a loaded machine the kill may land after the victim's trial ended (the study then
    # finishes whole, with nothing to resume): that try says nothing, and another is made.
    for attempt in range(3):
        outcome = _kill_a_worker_mid_trial(tmp_path / f"try-{attempt}")
        if outcome is not None:
            break
    assert outcome is not None, "the kill never landed inside a trial in 3 tries"
    command, study, number = outcome
    assert subprocess.run(command, capture_output=True).returncode == 0
    trials = _trials(study)
    assert [t.state.name for t in trials].count("COMPLETE") == 4
    assert any(t.user_attrs.get("retry_of") == number for t in trials)


def _kill_a_worker_mid_trial(folder):
    """SIGKILL the worker of the latest trial training; the tune command's one line. None
    when the kill landed after that trial ended (every trial finished)."""
    folder.mkdir()
    config = _yaml(folder / "tune.yaml", folder / "study", epochs=30,
                   checkpoint_every_n_steps=5)  # fmt: skip
    command = _tune_command(config, "--trials", "4", "--workers", "2", "--pruner", "none")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    _wait_for(folder / "study" / "trial-0001" / "metrics.jsonl", process)  # it trains
    running = [t for t in _trials(folder / "study") if t.state.name == "RUNNING"]
    running = [t for t in running if "pid" in t.user_attrs]
    victim_trial = max(running, key=lambda t: t.number)  # the latest: most of it ahead
    victim = victim_trial.user_attrs["pid"]
    os.kill(victim, signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"pid {victim} killed by SIGKILL" in last
    assert "run the same command again" in last
    if "4 of 4 trials finished" in last:
        return None
    resumed = re.search(r"trial (\d+) will resume from its run directory", last)
    assert resumed is not None, last
    return command, folder / "study", int(resumed.group(1))


@pytest.mark.slow
def test_two_workers_draw_eight_distinct_random_trials(tmp_path):
    space = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}}
    result = tune(_config(tmp_path / "study", epochs=1), space, trials=8, workers=2,
                  sampler="random", pruner="none")  # fmt: skip
    assert len(result.trials) == 8
    assert len(_distinct(result)) == 8


@pytest.mark.slow
def test_two_machines_on_one_postgresql_study_end_with_exactly_n_distinct_trials(tmp_path):
    pgserver = pytest.importorskip("pgserver", reason="pgserver (a bundled PostgreSQL) is absent")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    try:
        server = pgserver.get_server(str(tmp_path / "pg"), cleanup_mode="stop")
    except Exception as error:  # no shared memory, an odd platform: say why
        pytest.skip(f"PostgreSQL could not start here: {error}")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://")
        runs = []
        for machine in ("a", "b"):
            config = _yaml(tmp_path / f"{machine}.yaml", tmp_path / machine, epochs=2)
            command = _tune_command(config, "--trials", "8", "--storage", url,
                                    "--study-name", "shared", "--sampler", "random",
                                    "--pruner", "none")  # fmt: skip
            runs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True))  # fmt: skip
        for run in runs:
            _, err = run.communicate(timeout=600)
            assert run.returncode == 0, err
        trials = optuna.load_study(study_name="shared", storage=url).get_trials()
        kept = [t for t in trials if "surplus" not in t.user_attrs]
        assert [t.state.name for t in kept].count("COMPLETE") == 8
        assert len({tuple(sorted(t.params.items())) for t in kept}) == 8
        assert {t.user_attrs["run_dir"].split("/")[-2] for t in kept} == {"a", "b"}
    finally:
        server.cleanup()


def _ask_at_once(storage, study_dir, barrier, answers):
    """One process of `test_processes_asking_at_once_never_share_a_queued_trial`."""
    import optuna

    from traineval.tuning.trial import next_trial

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=storage)
    barrier.wait()
    answers.put(next_trial(study, 10, study_dir).number)


@pytest.mark.slow
def test_processes_asking_at_once_never_share_a_queued_trial(tmp_path):
    # SQLite ignores Optuna's row lock: without the study's ask lock, two processes popped
    # the one queued trial together in 5 of 10 rounds (the CI failure of the two-worker test)
    import multiprocessing

    import optuna

    context = multiprocessing.get_context("spawn")
    for round_ in range(4):
        storage = f"sqlite:///{tmp_path}/race-{round_}.db"
        study = optuna.create_study(study_name="race", storage=storage)
        study.enqueue_trial({"x": 1.0})
        barrier, answers = context.Barrier(2), context.Queue()
        processes = [
            context.Process(target=_ask_at_once, args=(storage, str(tmp_path), barrier, answers))
            for _ in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
        assert sorted([answers.get(timeout=5), answers.get(timeout=5)]) == [0, 1]


def test_a_study_with_the_defaults_repeats_no_notice(tmp_path):
    """Each trial is a run: a notice a run prints (precision, warmup) would be printed once
    per trial. With the defaults none is printed, and Optuna's own line comes once."""
    import collections
    import subprocess
    import sys

    config = tmp_path / "tune.yaml"
    config.write_text(
        "data: {name: iris}\nmodel: {name: mlp, options: {hidden_sizes: [8]}}\n"
        f"training: {{num_epochs: 2, tensorboard_logging: false, output_dir: {tmp_path / 's'}}}\n"
        "search:\n  learning_rate: {low: 1.0e-3, high: 1.0e-1, log: true}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "traineval.cli", "tune", str(config), "--trials", "3"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    notices = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not line.startswith(("epoch ", "trial ", "pruned by the study"))
    ]
    repeated = [line for line, n in collections.Counter(notices).items() if n > 1]
    assert repeated == []
    assert "mixed precision" not in done.stderr
    assert "warmup_steps=" not in done.stderr


def test_a_retry_asks_the_pruner_about_what_its_trial_had_reported(tmp_path):
    """A signal in the step after the validation at which the pruner would stop the trial
    (the run saved after it): the retry resumed past that validation, never asked the
    pruner, and trained on to another value (pruned at step 40, not 20)."""
    from types import SimpleNamespace

    from traineval.tuning.trial import OptunaPruning, queue_retry

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("run_dir", str(tmp_path))
    for step, value in ((10, 0.5), (20, 0.3)):
        trial.report(value, step)
    assert queue_retry(study, study._storage.get_trial(trial._trial_id), "SIGTERM")
    retry = study.ask()  # the queued retry
    assert retry.user_attrs["reported"] == {"10": 0.5, "20": 0.3}

    class Pruner:  # prunes once step 20 is reported, as the pruner would have
        def __init__(self):
            self.user_attrs, self.reports = retry.user_attrs, []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return any(step == 20 for step, _ in self.reports)

    stops: list[str] = []
    control = SimpleNamespace(state=SimpleNamespace(global_step=20), request_stop=stops.append)
    pruning = OptunaPruning(Pruner(), "val_accuracy")
    pruning.on_train_start(control)
    assert pruning.pruned_at == 20
    assert stops == ["pruned by the study at step 20 (val_accuracy 0.3)"]
    early = OptunaPruning(Pruner(), "val_accuracy")  # resumed before step 20: not yet
    early.on_train_start(SimpleNamespace(state=SimpleNamespace(global_step=15),
                                         request_stop=stops.append))  # fmt: skip
    assert early.pruned_at is None
    assert early.trial.reports == [(10, 0.5)]


def test_a_resumed_trials_seconds_count_every_run_it_continues(tmp_path, monkeypatch):
    """A retry's seconds were those of its last run only (the interrupted ones had none)."""
    import datetime
    import types

    from traineval.tuning import trial as trials

    class Later(datetime.datetime):  # each trial is stopped 30 s after it started
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(seconds=30)

    monkeypatch.setattr(trials, "datetime", types.SimpleNamespace(datetime=Later))
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("run_dir", str(tmp_path))
    trials.record_interrupted(study, trial, "SIGTERM")
    first = study._storage.get_trial(trial._trial_id).user_attrs["seconds"]
    assert 30 <= first < 40
    retry = study.ask()
    assert retry.user_attrs["seconds_before"] == first
    trials.record_interrupted(study, retry, "SIGTERM")
    second = study._storage.get_trial(retry._trial_id).user_attrs["seconds"]
    assert 60 <= second < 80
    last = study.ask()
    trials.record(study, last, {"value": 0.9, "pruned_at": None, "seconds": 5.0})
    assert study.trials[-1].user_attrs["seconds"] == pytest.approx(second + 5.0)


def test_a_queued_retry_is_shown_with_the_values_it_will_run(tmp_path):
    """A retry queued by an interrupted trial showed as 'waiting' with no parameters."""
    from traineval.tuning.study import trial_records

    settings = prepare(_config(tmp_path / "s", epochs=1), SEARCH, TuneOptions(trials=2))
    study = open_study(settings)
    study.enqueue_trial({"training.learning_rate": 0.01, "training.batch_size": 16})
    (record,) = trial_records(study, settings.params)
    assert record["state"] == "queued"
    assert record["params"] == {"training.learning_rate": 0.01, "training.batch_size": 16}


def test_a_study_whose_metric_of_yours_raises_stops_after_three_trials(tmp_path, monkeypatch):
    """A metric that raises failed every trial after its first validation, each named by
    its own checkpoint's path, so no two failures read the same: the study ran them all."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "brokenmetric", raising=False)
    (tmp_path / "brokenmetric.py").write_text("def broken(y_true, y_pred):\n    return {}[1]\n")
    data = _config(tmp_path / "s", epochs=1).to_dict()
    data["evaluation"] = {"classification_metrics": ["accuracy", "brokenmetric:broken"]}
    config = RunConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"3 trials in a row failed the same way: metric 'brok"):
        tune(config, SEARCH, trials=6)
    assert len(list((tmp_path / "s").glob("trial-*"))) == 3


@pytest.mark.slow
def test_workers_whose_trials_are_refused_stop_the_study_as_bad_input(tmp_path, monkeypatch):
    """With --workers 2 a worker's 'three in a row' exited 1 and the driver said a worker
    was lost (a fault: 'run the same command again'), while the other worker went on."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "nevermodels.py").write_text(
        "def never(input_shape, output_dim, width=32):\n    raise ValueError('no model today')\n"
    )
    data = _config(tmp_path / "s", epochs=1).to_dict()
    data["model"] = {"name": "nevermodels:never", "options": {"width": 32}}
    with pytest.raises(ValueError, match=r"stopped the study on bad input"):
        tune(RunConfig.from_dict(data), {"model.options.width": [16, 32]}, trials=8, workers=2)
