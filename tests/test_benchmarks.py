"""The GPU benchmark script, checked on the CPU before any device time is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_peers.py"


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_compiled_loops_and_writes_profiles(tmp_path):
    loops = "hand-written careful,traineval compile"
    command = [sys.executable, str(SCRIPT), "--smoke", "--workloads", "gpt", "--repeats", "1"]
    command += ["--steps", "7", "--warmup", "1", "--batch", "2", "--loops", loops]
    command += ["--profile", str(tmp_path / "profiles"), "--json", str(tmp_path / "runs.jsonl")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed" not in done.stdout, done.stdout
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [run["loop"] for run in runs] == loops.split(",")
    assert all(run["tokens_per_sec"] > 0 and run["profiled"] for run in runs)
    tables = sorted(path.name for path in (tmp_path / "profiles").iterdir())
    assert tables == ["gpt-hand-written_careful.txt", "gpt-traineval_compile.txt"]
    assert "CompiledFxGraph" in (tmp_path / "profiles" / "gpt-traineval_compile.txt").read_text()
