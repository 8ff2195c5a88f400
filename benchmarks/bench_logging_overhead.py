"""Cost of logging and monitoring: everything on vs everything off, same training run.

On: metrics.jsonl + TensorBoard + W&B (WANDB_MODE=offline), performance and gradient
monitoring every 100 steps, progress bar (to /dev/null). Off: no TensorBoard, no progress
bar, nothing logged during the run (log_frequency above the run's length). Tiny MLP
32-64-10, batch 32, 2,000 updates, one CPU thread; each run in its own process,
alternating; ratio of median times.
Start-up (W&B starts a service process) counts: it is part of what a user waits for.

    .venv/bin/python benchmarks/bench_logging_overhead.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from bench_loop_overhead import make_data, make_model, warm_up
from traineval import TrainingConfig, TrainingManager

SETTINGS = {
    "on": {
        "tensorboard_logging": True,
        "wandb_logging": True,
        "progress_bar": True,
        "log_frequency": 100,
    },
    "off": {"tensorboard_logging": False, "progress_bar": False, "log_frequency": 10**9},
}


def run_one(which: str, steps: int) -> None:
    torch.set_num_threads(1)
    data = make_data(steps, 32)
    model = make_model()
    warm_up()
    loader = DataLoader(data, 32, shuffle=True)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=1,
            max_steps=steps,
            warmup_steps=100,
            output_dir=folder,
            **SETTINGS[which],
        )
        started = time.perf_counter()
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            TrainingManager(config).train(model, loader)
        print(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--run", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.steps)
        return
    times: dict[str, list[float]] = {"on": [], "off": []}
    for repeat in range(args.repeats):
        order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
        for which in order:
            command = [sys.executable, __file__, "--run", which, "--steps", str(args.steps)]
            environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
            out = subprocess.run(
                command, capture_output=True, text=True, check=True, env=environment
            ).stdout
            times[which].append(float(out.split()[-1]))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"| logging | median s ({args.repeats} runs each) | relative |")
    print("|---|---|---|")
    print(f"| all off | {off:.3f} | 1.000 |")
    label = "jsonl + TensorBoard + W&B offline + monitors every 100 steps + bar"
    print(f"| {label} | {on:.3f} | {on / off:.3f} |")
    print(f"overhead: {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    main()
