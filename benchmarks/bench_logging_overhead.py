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
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench_loop_overhead import make_data, make_model, warm_up
from traineval import Callback, TrainingConfig, TrainingManager

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
        clock = LoopClock()
        started = time.perf_counter()
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            TrainingManager(config).train(model, loader, callbacks=[clock])
        print(time.perf_counter() - started, clock.seconds)


class LoopClock(Callback):
    """Time from the loop's start to its end: the per-step cost, without logger start-up."""

    def on_train_start(self, loop: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, loop: Any, logs: dict[str, Any]) -> None:
        self.seconds = time.perf_counter() - self.started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--run", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.steps)
        return
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for repeat in range(args.repeats):
        order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
        for which in order:
            command = [sys.executable, __file__, "--run", which, "--steps", str(args.steps)]
            environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
            out = subprocess.run(
                command, capture_output=True, text=True, check=True, env=environment
            ).stdout
            total, loop = out.split()[-2:]
            times[which].append((float(total), float(loop)))
    label = "jsonl + TensorBoard + W&B offline + monitors every 100 steps + bar"
    print(f"| logging ({args.repeats} runs each, medians) | train() s | loop s |")
    print("|---|---|---|")
    medians = {}
    for which, name in (("off", "all off"), ("on", label)):
        total = statistics.median(t for t, _ in times[which])
        loop = statistics.median(lp for _, lp in times[which])
        medians[which] = (total, loop)
        print(f"| {name} | {total:.3f} | {loop:.3f} |")
    (total_off, loop_off), (total_on, loop_on) = medians["off"], medians["on"]
    print(
        f"overhead per step (loop): {100 * (loop_on / loop_off - 1):+.1f}%; whole train() "
        f"call with logger start-up and shutdown: {100 * (total_on / total_off - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
