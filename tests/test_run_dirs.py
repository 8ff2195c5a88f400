"""The run directory as a resource: one run at a time (a lock a killed run does not leave
stuck), unique default names and temp files, files written whole or not at all."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from traineval import TrainingConfig, TrainingManager
from traineval.cli import main
from traineval.runs.checkpoint import save_safetensors
from traineval.runs.rundir import RunDirInUse, default_run_dir, run_dir_lock
from traineval.system.files import atomic_write_text

from conftest import iris_demo

HOLD = (
    "import os, sys, time\n"
    "from traineval.runs.rundir import run_dir_lock\n"
    "with run_dir_lock(sys.argv[1]):\n"
    "    child = os.fork() if len(sys.argv) > 2 else 1  # like a DataLoader worker\n"
    "    if child == 0:\n"
    "        time.sleep(600)\n"
    "        os._exit(0)\n"
    "    print('held', child, flush=True)\n"
    "    time.sleep(600)\n"
)


def _demo(run, *extra):
    return iris_demo(run, *extra)


@pytest.mark.parametrize("forks", [False, True])
def test_a_second_run_on_a_directory_in_use_is_refused_and_a_killed_holder_frees_it(
    tmp_path, capsys, forks
):
    """Also when the killed run leaves forked children behind (loader workers): they do not
    inherit the lock."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), *(["fork"] if forks else [])],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        assert holder.stdout is not None
        word, child = holder.stdout.readline().split()
        assert word == "held"
        assert main(_demo(run)) == 1
        err = capsys.readouterr().err
        assert "is in use by another run" in err
        assert f"pid {holder.pid}" in err
        assert not (run / "checkpoints").exists()  # refused before any work
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert main(_demo(run)) == 0  # released with the dead holder, its child still alive
    finally:
        holder.kill()
        holder.wait()
        if forks and child is not None and int(child) > 1:
            os.kill(int(child), signal.SIGKILL)


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path, capsys):
    """The folder itself is locked too: a new `.lock` file of a second run is not enough."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().split()[0] == b"held"
        (run / ".lock").unlink()
        assert main(_demo(run)) == 1
        assert "is in use by another run" in capsys.readouterr().err
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(_demo(run)) == 0


def test_the_lock_is_per_run_not_per_process(tmp_path):
    """Re-entrant in one thread (run_experiment holds it around train); another thread of
    the same process is another run."""
    folder = tmp_path / "run"
    refused = []

    def other_run():
        try:
            with run_dir_lock(folder):
                pass
        except RunDirInUse as error:
            refused.append(str(error))

    with run_dir_lock(folder), run_dir_lock(folder):
        worker = threading.Thread(target=other_run)
        worker.start()
        worker.join()
    assert len(refused) == 1
    with run_dir_lock(folder):  # released by the outer exit
        pass


def test_python_api_runs_on_one_directory_are_refused_too(tmp_path):
    folder = tmp_path / "run"
    config = TrainingConfig(num_epochs=1, output_dir=str(folder), progress_bar=False)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    errors = []

    def other_run():
        try:
            TrainingManager(config).train(torch.nn.Linear(4, 2), loader)
        except RunDirInUse as error:
            errors.append(error)

    with run_dir_lock(folder):
        worker = threading.Thread(target=other_run)
        worker.start()
        worker.join()
    assert len(errors) == 1
    assert "output_dir=" in str(errors[0])


def test_default_run_directories_are_unique_within_a_second():
    names = {default_run_dir("run") for _ in range(200)}
    assert len(names) == 200
    config = TrainingConfig(num_epochs=1)
    assert TrainingManager(config).output_dir != TrainingManager(config).output_dir


def test_writers_of_one_file_never_share_a_temp_file(tmp_path):
    path = tmp_path / "best.safetensors"
    model = torch.nn.Linear(256, 256)
    errors = []

    def save(times):
        try:
            for _ in range(times):
                save_safetensors(model, path)
                atomic_write_text(tmp_path / "summary.json", "{}" * 10000)
        except Exception as error:
            errors.append(error)

    workers = [threading.Thread(target=save, args=(25,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "training: {num_epochs: 3}\n")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "training: {num_epochs: 5}\n" * 1000)
    assert path.read_text() == "training: {num_epochs: 3}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_run_records_are_written_atomically(tmp_path, monkeypatch):
    """config.yaml, summary.json and evaluation/metrics.json go through the atomic writer."""
    import traineval.system.files as files

    written = []
    real = files.atomic_write_text

    def spy(path, text):
        written.append(os.path.relpath(path, tmp_path / "run"))
        return real(path, text)

    monkeypatch.setattr(files, "atomic_write_text", spy)
    importers = ("traineval.config.config_file", "traineval.config.training_config")
    for name in (*importers, "traineval.commands.experiment"):  # modules that import it
        module = importlib.import_module(name)
        if hasattr(module, "atomic_write_text"):
            monkeypatch.setattr(module, "atomic_write_text", spy)
    assert main(_demo(tmp_path / "run")) == 0
    for name in ("config.yaml", "summary.json", os.path.join("evaluation", "metrics.json")):
        assert name in written


def _two_epoch_run(tmp_path):
    run = tmp_path / "run"
    assert main(_demo(run, "training.num_epochs=2", "training.checkpoint_save_frequency=1")) == 0
    return run


def test_auto_resume_picks_by_the_recorded_step_not_the_file_time(tmp_path, caplog):
    from traineval.runs.checkpoint import load_checkpoint_file
    from traineval.runs.resume import find_checkpoint

    run = _two_epoch_run(tmp_path)
    folder = run / "checkpoints"
    older = folder / "epoch-0001.pt"
    assert (
        load_checkpoint_file(older)["global_step"]
        < load_checkpoint_file(folder / "last.pt")["global_step"]
    )
    future = time.time() + 3600
    os.utime(older, (future, future))  # a copy or a backup restore
    with caplog.at_level("INFO", logger="traineval.runs.resume"):
        path, payload = find_checkpoint(run, "auto")
    assert path.name == "last.pt"
    assert payload["global_step"] == load_checkpoint_file(folder / "last.pt")["global_step"]
    assert "auto-resume chose last.pt" in caplog.text


def test_auto_resume_refuses_when_every_checkpoint_is_corrupt(tmp_path, capsys):
    run = _two_epoch_run(tmp_path)
    files = sorted((run / "checkpoints").glob("*.pt"))
    for path in files:
        path.write_bytes(b"garbage")
    events = (run / "metrics.jsonl").read_text()
    assert main(_demo(run, "training.num_epochs=3", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err
    for path in files:
        assert path.name in err
        assert path.read_bytes() == b"garbage"  # nothing overwritten
    assert (run / "metrics.jsonl").read_text() == events


def test_a_run_written_with_the_earlier_metric_names_evaluates_and_resumes(tmp_path):
    """Before one naming scheme, runs wrote `val/accuracy`: read as `val_accuracy`."""
    import json

    import torch
    import yaml

    run = tmp_path / "run"
    assert main(_demo(run, "training.monitor_metric=val_accuracy", "training.num_epochs=2")) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["training"]["monitor_metric"] = "val/accuracy"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    renamed = [{k.replace("val_", "val/", 1): v for k, v in r.items()} for r in lines]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    for name in ("last.pt", "best.pt"):
        payload = torch.load(run / "checkpoints" / name, weights_only=True)
        payload["monitor"]["name"] = "val/accuracy"
        payload["config"]["monitor_metric"] = "val/accuracy"
        torch.save(payload, run / "checkpoints" / name)
    assert main(["evaluate", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["fit", str(run / "config.yaml"), "-q", "training.num_epochs=3", "--resume",
                 "auto"]) == 0  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert summary["monitor_metric"] == "val_accuracy"


def test_overwriting_a_run_removes_its_checkpoints_so_a_resume_finds_only_the_new_ones(
    quiet_config,
):
    """overwrite_output_dir left the earlier run's checkpoints beside the new run's: a
    later resume_from="auto" took the earlier epoch-0005.pt (further along) for this run."""
    from torch.utils.data import DataLoader

    from traineval.training.loop import TrainingInterrupted

    from conftest import InterruptAt, make_classification, make_mlp

    def config() -> TrainingConfig:
        settings = {"num_epochs": 6, "checkpoint_save_frequency": 5, "batch_size": 8}
        return TrainingConfig(**{**quiet_config, **settings, "overwrite_output_dir": True})

    earlier, data = (DataLoader(make_classification(40, seed=s), 8) for s in (7, 0))
    TrainingManager(config()).train(make_mlp(), earlier)
    folder = config().output_dir + "/checkpoints"
    assert "epoch-0005.pt" in os.listdir(folder)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config()).train(make_mlp(), data, callbacks=[InterruptAt(3)])
    assert os.listdir(folder) == ["last.pt"]  # the earlier run's files are gone
    assert not os.path.exists(config().output_dir + "/.overwritten")
    resumed = make_mlp()
    result = TrainingManager(config()).train(resumed, data, resume_from="auto")
    assert result["training_history"]["epoch"] == [1, 2, 3, 4, 5, 6]  # all of this run's


def _files(folder) -> dict[str, bytes]:
    """Every file under `folder` (but the lock) by relative path, with its bytes."""
    from pathlib import Path

    root = Path(folder)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _overwrite_setup(quiet_config):
    from torch.utils.data import DataLoader

    from conftest import make_classification

    settings = {**quiet_config, "num_epochs": 2, "batch_size": 8, "overwrite_output_dir": True}
    loader = DataLoader(make_classification(40, seed=7), 8)
    return settings, loader


def test_an_overwriting_run_that_fails_before_its_first_checkpoint_loses_nothing(quiet_config):
    """overwrite_output_dir deleted the earlier run's checkpoints before a bad value (class
    weights for 2 classes of 3, found at the first batch) stopped the new run: both were
    lost. The earlier run's files are now set aside and come back, byte for byte."""
    from conftest import make_mlp

    settings, loader = _overwrite_setup(quiet_config)
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(), loader)
    folder = settings["output_dir"]
    os.makedirs(f"{folder}/evaluation")
    atomic_write_text(f"{folder}/evaluation/metrics_test.json", '{"accuracy": 0.74}')
    before = _files(folder)
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "summary.json"} <= set(before)
    bad = TrainingConfig(**{**settings, "class_weights": [1.0, 2.0]})
    with pytest.raises(ValueError, match="2 class weights"):
        TrainingManager(bad).train(make_mlp(), loader)
    assert _files(folder) == before
    assert not os.path.exists(f"{folder}/.overwritten")


def test_an_overwriting_run_that_ends_drops_the_earlier_runs_outputs(quiet_config):
    """Only the checkpoints went: the earlier run's test metrics, TensorBoard events and
    logger ids stayed, and `report` showed them as the new run's."""
    from pathlib import Path

    from conftest import make_mlp

    settings, loader = _overwrite_setup(quiet_config)
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(), loader)
    folder = settings["output_dir"]
    os.makedirs(f"{folder}/evaluation")
    earlier = ("evaluation/metrics_test.json", "wandb_run_id.txt", "final_model.safetensors")
    for name in (*earlier, "notes.txt"):
        atomic_write_text(f"{folder}/{name}", "earlier")
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(seed=1), loader)
    assert not os.path.exists(f"{folder}/evaluation")
    assert not os.path.exists(f"{folder}/wandb_run_id.txt")
    assert not os.path.exists(f"{folder}/final_model.safetensors")  # evaluate took it
    assert not os.path.exists(f"{folder}/.overwritten")
    assert Path(folder, "notes.txt").read_text() == "earlier"  # yours: not a run output
    assert sorted(os.listdir(f"{folder}/checkpoints")) == ["best.pt", "best.safetensors", "last.pt"]


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_start(
    quiet_config,
):
    """A kill -9 between setting the earlier run aside and this run's first checkpoint
    leaves `.overwritten`; the next start on the folder puts it back, and a resume then
    continues the earlier run."""
    from traineval.runs import overwrite

    from conftest import make_mlp

    settings, loader = _overwrite_setup(quiet_config)
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(), loader)
    folder = settings["output_dir"]
    before = _files(folder)
    from pathlib import Path

    overwrite.set_aside(Path(folder))  # where the killed run left it, mid-way through
    Path(folder, "checkpoints", ".best.pt.k3j2.tmp").write_bytes(b"cut short")  # its save
    assert not overwrite.has_a_checkpoint(Path(folder, "checkpoints"))
    longer = TrainingConfig(**{**settings, "num_epochs": 3, "overwrite_output_dir": False})
    result = TrainingManager(longer).train(make_mlp(), loader, resume_from="auto")
    assert result["training_history"]["epoch"] == [1, 2, 3]  # it resumed the earlier run
    assert not os.path.exists(f"{folder}/.overwritten")
    assert set(before) <= set(_files(folder))


def test_an_overwrite_of_a_run_that_kept_no_checkpoints_sets_its_outputs_aside(quiet_config):
    """Only a folder with checkpoints was set aside: a run that kept none left its
    evaluation files and TensorBoard events beside the new run's."""
    from conftest import make_mlp

    settings, loader = _overwrite_setup(quiet_config)
    settings.update(save_best_model=False, save_last_checkpoint=False)
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(), loader)
    folder = settings["output_dir"]
    os.makedirs(f"{folder}/evaluation")
    atomic_write_text(f"{folder}/evaluation/predictions_test.csv", "earlier")
    TrainingManager(TrainingConfig(**settings)).train(make_mlp(seed=1), loader)
    assert not os.path.exists(f"{folder}/evaluation")
    assert not os.path.exists(f"{folder}/.overwritten")


def test_a_report_probing_the_folder_does_not_refuse_a_run_starting_then(tmp_path):
    """`report` tells a running run by taking the folder's lock for an instant; a run
    starting in that instant was refused as 'in use by another run' (355 of 2000 starts
    in a tight loop)."""
    import fcntl
    import os
    import threading

    from traineval.runs.rundir import in_use, run_dir_lock

    folder = tmp_path / "run"
    folder.mkdir()
    probe = os.open(folder, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # a probe's shared lock, dropped 50 ms later
    threading.Timer(0.05, os.close, (probe,)).start()
    with run_dir_lock(folder):  # waits the probe out instead of refusing
        assert in_use(folder)
    assert not in_use(folder)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_runs_files_have_the_mode_the_umask_gives(tmp_path, umask):
    """Every file written atomically was 0600 whatever the umask (mkstemp's mode): a
    teammate or a serving account could not read a run's checkpoints, config or
    predictions. A run's files now have what open() gives them (0644 under umask 022)."""
    script = (
        "import os, sys\n"
        f"os.umask({umask})\n"
        "from traineval.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", script, *iris_demo(run, "training.tensorboard_logging=false")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]
    wanted = 0o666 & ~umask
    assert {p.name for p in files} >= {"config.yaml", "summary.json", "best.pt", "last.pt"}
    assert {p.relative_to(run).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(run).as_posix(): oct(wanted) for p in files
    }


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_rewritten_file_keeps_its_mode_and_a_new_one_follows_the_umask_now(tmp_path):
    """The umask was read once, at import (a later os.umask was not followed), and a file
    rewritten got the umask's mode (a user's chmod 600 was undone)."""
    path = tmp_path / "notes.json"
    before = os.umask(0o077)  # set after traineval was imported
    try:
        atomic_write_text(path, "{}")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(before)
    path.chmod(0o640)
    atomic_write_text(path, "[]")
    assert path.stat().st_mode & 0o777 == 0o640
