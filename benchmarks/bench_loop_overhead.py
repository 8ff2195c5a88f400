"""Loop overhead: traineval vs a careful hand-written loop doing the same work.

Workload: MLP 32-64-10, batch 32, CPU, one thread, 2,000 optimizer updates (one epoch of
64,000 samples), AdamW (fused), clipping at 1.0, linear warmup + cosine, fp32. traineval runs
with its defaults: progress bar on (drawn to /dev/null), metrics.jsonl, checkpoints.
Each run is its own process (same warm-up in both), alternated A B B A ...; the ratio of
median times is reported, with the spread of the per-pair ratios.

    .venv/bin/python benchmarks/bench_loop_overhead.py [--repeats 8] [--steps 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traineval
from traineval import TrainingConfig, TrainingManager

WARMUP = 100


def make_data(steps: int, batch: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, 32, generator=generator)
    y = torch.randint(0, 10, (steps * batch,), generator=generator)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def hand_written(model: nn.Module, loader: DataLoader, steps: int) -> tuple[float, float]:
    """The careful loop: fused AdamW, no per-step sync, set_to_none, same schedule."""
    started, cpu_started = time.perf_counter(), time.process_time()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-5}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        fused=True,
    )

    def factor(t: int) -> float:
        if t < WARMUP:
            return (t + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (steps - WARMUP)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_fn = nn.CrossEntropyLoss()
    running = torch.zeros(())
    model.train()
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
    running.item()
    return time.perf_counter() - started, time.process_time() - cpu_started


def with_traineval(
    model: nn.Module, loader: DataLoader, steps: int, folder: str
) -> tuple[float, float]:
    config = TrainingConfig(
        num_epochs=1,
        max_steps=steps,
        warmup_steps=WARMUP,
        progress_bar=True,
        output_dir=folder,
        overwrite_output_dir=True,
        tensorboard_logging=False,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        result = TrainingManager(config).train(model, loader)
    elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    assert result["global_step"] == steps, result["global_step"]
    return elapsed


def warm_up() -> None:
    """What both runs pay once per process: the first fused optimizer imports torch._dynamo."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    nn.functional.cross_entropy(
        model(torch.randn(4, 32)), torch.zeros(4, dtype=torch.long)
    ).backward()
    optimizer.step()


def run_one(which: str, steps: int) -> None:
    """Time one run in this (fresh) process and print `wall cpu` seconds."""
    torch.set_num_threads(1)
    data = make_data(steps, 32)
    model = make_model()
    warm_up()
    loader = DataLoader(data, 32, shuffle=True)
    if which == "raw":
        wall, cpu = hand_written(model, loader, steps)
    else:
        with tempfile.TemporaryDirectory() as folder:
            wall, cpu = with_traineval(model, loader, steps, folder)
    print(f"{wall} {cpu}")


def measure(which: str, steps: int) -> tuple[float, float]:
    command = [sys.executable, __file__, "--run", which, "--steps", str(steps)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall, cpu = out.split()
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--run", choices=("raw", "traineval"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.steps)
        return
    raw_times, ours_times = [], []
    for repeat in range(args.repeats):
        # alternate which goes first, so neither always follows the other
        order = ("raw", "traineval") if repeat % 2 == 0 else ("traineval", "raw")
        for which in order:
            (raw_times if which == "raw" else ours_times).append(measure(which, args.steps))
    print(f"# loop overhead: MLP 32-64-10, batch 32, {args.steps} steps, 1 CPU thread")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"traineval {traineval.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.repeats} alternating pairs"
    )
    print()
    print(
        "| loop | clock | median s | steps/s | ratio of medians | per-pair ratio min/median/max |"
    )
    print("|---|---|---|---|---|---|")
    for clock, index in (("wall", 0), ("cpu", 1)):
        raw = statistics.median(t[index] for t in raw_times)
        ours = statistics.median(t[index] for t in ours_times)
        pairs = sorted(r[index] / o[index] for r, o in zip(raw_times, ours_times, strict=True))
        spread = f"{pairs[0]:.3f} / {statistics.median(pairs):.3f} / {pairs[-1]:.3f}"
        print(
            f"| hand-written (careful) | {clock} | {raw:.3f} | {args.steps / raw:.0f} | 1.000 | |"
        )
        print(
            f"| traineval defaults | {clock} | {ours:.3f} | {args.steps / ours:.0f} | "
            f"{raw / ours:.3f} | {spread} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
