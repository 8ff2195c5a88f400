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
