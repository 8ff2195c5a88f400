"""Data-parallel scaling on this machine's CPU cores: 2 gloo ranks vs 1 process.

Workload: the small CNN of the peer benchmarks (3x32x32 inputs, 10 classes), fp32, AdamW,
clipping at 1.0, the same global batch of 64 and the same number of updates in every
variant, traineval lean (no bar, no checkpoints):
- 1 process, 1 thread, batch 64 (what one core does);
- 1 process, 2 threads, batch 64 (intra-op parallelism over both cores);
- 2 ranks under torchrun, 1 thread each, batch 32 per rank (DDP, gloo all-reduce).
Each variant is its own launch, alternated; the table gives the median training time
(TrainingResult.train_seconds, rank 0) and the whole command's wall time.

    .venv/bin/python benchmarks/bench_ddp.py [--repeats 3] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
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

from peers import small_cnn

GLOBAL_BATCH = 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn()


def train(steps: int, threads: int) -> None:
    from traineval import TrainingConfig, TrainingManager

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generator = torch.Generator().manual_seed(0)
    n = steps * GLOBAL_BATCH
    data = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )
    batch = GLOBAL_BATCH // world
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=1,
            batch_size=batch,
            learning_rate=1e-3,
            scheduler_type="constant",
            warmup_steps=0,
            output_dir=os.environ.get("BENCH_DIR", folder),
            progress_bar=False,
            tensorboard_logging=False,
            log_frequency=10**6,
            save_best_model=False,
            save_last_checkpoint=False,
            checkpoint_save_frequency=0,
            device="cpu",
            overwrite_output_dir=True,
        )
        result = TrainingManager(config).train(make_model(), DataLoader(data, batch_size=batch))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"train_seconds": result.train_seconds, "steps": result.global_step}))


VARIANTS = {
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 ranks x 1 thread (DDP, gloo)": (2, 1),
}


def launch(name: str, steps: int) -> tuple[float, float]:
    ranks, threads = VARIANTS[name]
    worker = [__file__, "--worker", str(steps), str(threads)]
    if ranks == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(ranks), *worker]
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "BENCH_DIR": folder, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        wall = time.perf_counter() - started
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return record["train_seconds"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train(*args.worker)
        return
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            results[name].append(launch(name, args.steps))
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} "
        f"cores; CNN 3x32x32, global batch {GLOBAL_BATCH}, {args.steps} updates, "
        f"{args.repeats} launches per variant (alternating), medians"
    )
    print()
    print("| variant | train s | samples/s | speed-up vs 1 thread | wall s (whole launch) |")
    print("|---|---|---|---|---|")
    base = statistics.median(t for t, _ in results[names[0]])
    for name in names:
        train_s = statistics.median(t for t, _ in results[name])
        wall = statistics.median(w for _, w in results[name])
        rate = args.steps * GLOBAL_BATCH / train_s
        print(f"| {name} | {train_s:.2f} | {rate:,.0f} | {base / train_s:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
