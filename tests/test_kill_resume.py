"""kill -9 at random points, resume in a new process: the same result as a straight run."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from traineval.loggers import read_jsonl
from traineval.runs.checkpoint import load_checkpoint_file

WORKER = Path(__file__).with_name("resume_worker.py")


def _start(output_dir: Path, workers: int, writer: str = "sync") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(output_dir), str(workers), writer],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["train_step_loss"])
        for r in read_jsonl(output_dir / "metrics.jsonl")
        if r["event"] == "train"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "writer"),
    [(0, "sync"), (2, "sync"), (0, "process"), (0, "sharded")],
    ids=["0", "2", "process", "sharded-async"],
)
def test_kill_9_at_random_points_then_resume_equals_the_straight_run(tmp_path, workers, writer):
    """`process`: the checkpoints are written by a writer process (async), killed with the
    training process; `sharded`: sharded checkpoints written by the background shard
    writer; the straight run writes full checkpoints synchronously."""
    straight = tmp_path / "straight"
    assert _start(straight, workers).wait(timeout=300) == 0

    run = tmp_path / "killed"
    rng = random.Random(workers)
    kills = 0
    for _ in range(4):
        process = _start(run, workers, writer)
        line = process.stdout.readline()  # "training from step N": past start-up
        if not line.startswith("training"):
            break
        time.sleep(rng.uniform(0.05, 0.6))  # each step also writes a checkpoint
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        last = run / "checkpoints" / "last.pt"
        if last.exists():
            load_checkpoint_file(last)  # the newest "last" is never corrupt
    assert kills >= 2
    final = _start(run, workers, writer)
    assert final.wait(timeout=300) == 0

    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(run / "final.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(run) == _losses(straight)
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no temp files left behind
    named = {torch.load(f, weights_only=True)["shards"] for f in run.glob("checkpoints/*.pt")}
    folders = {f.name for f in (run / "checkpoints").glob("*.shards-*")}
    assert folders == named - {None}  # a killed save's folder was removed by the next run
    assert (writer == "sharded") == bool(folders)


@pytest.mark.slow
def test_kill_9_in_a_cross_validation_then_resume_gives_the_uninterrupted_tables(tmp_path):
    """`traineval cv` killed (kill -9) inside its second fold, then run again with
    `--resume auto`: the first fold is kept, the second resumes from its last checkpoint,
    and cv.json equals the uninterrupted cross-validation's."""
    import json

    config = tmp_path / "cv.yaml"
    config.write_text(
        "data: {name: digits}\nmodel: {name: mlp, options: {hidden_sizes: [32]}}\n"
        "training: {num_epochs: 6, warmup_steps: 0, batch_size: 32, progress_bar: false, "
        "checkpoint_every_n_steps: 5, tensorboard_logging: false}\n"
    )

    def command(folder, *more):
        return [sys.executable, "-m", "traineval", "cv", str(config), "--folds", "3", "-q",
                f"training.output_dir={tmp_path / folder}", *more]  # fmt: skip

    assert subprocess.run(command("a"), capture_output=True, timeout=600).returncode == 0
    process = subprocess.Popen(command("b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "b" / "fold-2" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not second.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "b" / "fold-2" / "summary.json").exists()  # killed inside it
    again = subprocess.run(command("b", "--resume", "auto"), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    tables = [json.loads((tmp_path / r / "evaluation" / "cv.json").read_text()) for r in "ab"]
    for table in tables:
        del table["output_dir"], table["folds"], table["fold_checkpoints"]
    assert tables[0] == tables[1]
