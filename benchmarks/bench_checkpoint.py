"""Checkpoint cost and mid-epoch resume cost.

1. Save and load time of a full training checkpoint (weights + AdamW state, atomic write
   with fsync, weights_only load) for a ~100M-parameter model; beside it, the pause of an
   asynchronous save (`async_checkpointing`: the snapshot into host memory, the time the
   training thread waits) and the background write that follows.
2. Throughput of a training run that saves every `--every` updates, side by side in one
   process, interleaved: no saves, synchronous saves, asynchronous saves by the writer
   thread and by the writer process (`TrainingManager.train`, an MLP of `--train-params`
   parameters, AdamW, samples/s over the whole run), and the share of a synchronous save's
   cost that each asynchronous writer keeps; beside them a run that writes only the final
   file (`last`), which every writer waits for alike at the end, so that what the periodic
   saves add is also given on its own.
3. Resume overhead: time to skip to the middle of a 1,000,000-sample shuffled epoch, and
   proof that no skipped sample is read.

    .venv/bin/python benchmarks/bench_checkpoint.py [--params 100e6] [--train-params 25e6]
        [--updates 60] [--every 15] [--repeats 3] [--only-throughput] [--threads N]
        [--sharding full|sharded]

With `--sharding sharded` the checkpoints are sharded (torch.distributed.checkpoint, one
process) and "thread" is the background writer of sharded checkpoints
(`traineval.runs.shard_writer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.data.position import skip_batches
from traineval.runs import checkpoint_process
from traineval.runs.checkpoint import load_checkpoint_file, save_checkpoint_file
from traineval.runs.checkpoint_writer import CheckpointWriter, Write


class CountingDataset(Dataset):
    """1M samples; counts how many are read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor([float(index)])


def checkpoint_cost(params: float, folder: Path) -> None:
    width = 4096
    layers = max(1, round(params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    count = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materialise exp_avg / exp_avg_sq
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}
    path = folder / "last.pt"
    started = time.perf_counter()
    save_checkpoint_file(payload, path)
    saved = time.perf_counter() - started
    started = time.perf_counter()
    load_checkpoint_file(path)
    loaded = time.perf_counter() - started
    size = path.stat().st_size / 2**30
    print(
        f"| {count / 1e6:.1f}M params + AdamW state | {size:.2f} GiB | "
        f"save {saved:.2f} s ({size / saved:.2f} GiB/s) | load {loaded:.2f} s |"
    )
    writers = {"thread": CheckpointWriter()}
    if checkpoint_process.available():
        writers["process"] = checkpoint_process.ProcessWriter()
    for kind, writer in writers.items():
        for which in ("first", "next"):  # the next reuses the first's host buffers
            started = time.perf_counter()
            copied = writer.snapshot("checkpoint", payload)
            writer.submit([Write("checkpoint", folder / "async.pt", copied)], "async.pt")
            pause = time.perf_counter() - started
            writer.wait()
            written = time.perf_counter() - started
            print(
                f"| async save by the writer {kind} ({which}) | training pauses {pause:.2f} s "
                f"({100 * pause / saved:.1f}% of the synchronous save) | on disk after "
                f"{written:.2f} s |"
            )
        writer.close()


@dataclasses.dataclass(frozen=True)
class Workload:
    """The training runs compared: an MLP of `layers` blocks of `width`, `updates` updates
    saving every `every`, on `threads` CPU threads (0: all), checkpoints `sharding`."""

    width: int
    layers: int
    updates: int
    every: int
    threads: int = 0
    sharding: str = "full"


def _training_run(work: Workload, mode: str) -> float:
    """Samples/s of a run (mode: none, last (only the final file), sync, thread or process)."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(work.layers):
        blocks += [nn.Linear(work.width, work.width), nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(work.width, 10))
    n = work.updates * 64
    data = TensorDataset(torch.randn(n, work.width), torch.randint(0, 10, (n,)))
    with tempfile.TemporaryDirectory(dir=".") as folder:
        config = TrainingConfig(
            num_epochs=1,
            batch_size=64,
            warmup_steps=0,
            early_stopping_patience=0,
            progress_bar=False,
            tensorboard_logging=False,
            save_best_model=False,
            save_last_checkpoint=mode != "none",
            checkpoint_every_n_steps=work.every if mode not in ("none", "last") else 0,
            async_checkpointing=mode in ("thread", "process"),
            checkpoint_writer="process" if mode == "process" else "thread",
            checkpoint_sharding=work.sharding,
            cpu_threads=work.threads if work.threads else "auto",
            output_dir=folder,
        )
        result = TrainingManager(config).train(model, DataLoader(data, batch_size=64))
    return len(data) / result["train_seconds"]


def save_throughput(params: float, work: Workload, repeats: int) -> None:
    """The runs of every mode side by side, interleaved, and what each writer adds."""
    width = 2048
    layers = max(1, round(params / (width * width + width)))
    work = dataclasses.replace(work, width=width, layers=layers)
    count = layers * (width * width + width) + width * 10 + 10
    modes = ["none", "last", "sync", "thread"]  # sharded: "thread" is every rank's writer
    if checkpoint_process.available() and work.sharding == "full":
        modes.append("process")
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    samples = work.updates * 64
    for _ in range(repeats):  # interleaved: the machine's noise hits every mode alike
        for mode in modes:
            seconds[mode].append(samples / _training_run(work, mode))
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    added = {mode: median[mode] - median["none"] for mode in modes}
    print(
        f"{count / 1e6:.1f}M-param MLP, {work.updates} updates, a save every {work.every} "
        f"({work.updates // work.every} saves + last), {work.sharding} checkpoints, medians "
        f"of {repeats}, training on {work.threads or torch.get_num_threads()} of "
        f"{os.cpu_count()} cores, seconds of training:\n"
    )
    periodic = {mode: median[mode] - median["last"] for mode in modes}
    print(
        "| writer | seconds | added by saves | share of synchronous saves' cost | periodic "
        "saves only (minus `last`) | their share |"
    )
    print("|---|---|---|---|---|---|")
    for mode in modes:
        share = f"{100 * added[mode] / added['sync']:.0f}%" if mode != "none" else ""
        own = f"{100 * periodic[mode] / periodic['sync']:.0f}%" if mode in modes[2:] else ""
        print(
            f"| {mode} | {median[mode]:.2f} | {added[mode]:+.2f} | {share} | "
            f"{periodic[mode]:+.2f} | {own} |"
        )


def resume_cost(n: int) -> None:
    dataset = CountingDataset(n)
    loader = DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    middle = len(loader) // 2
    started = time.perf_counter()
    batches = skip_batches(loader, middle)
    first = next(batches)
    elapsed = time.perf_counter() - started
    print(
        f"| skip {middle:,} of {len(loader):,} batches ({n:,} samples, shuffled) | "
        f"{elapsed:.3f} s | samples read: {dataset.reads} (the one batch after the skip) |"
    )
    assert dataset.reads == len(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--train-params", type=float, default=25e6)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only-throughput", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="training's CPU threads")
    parser.add_argument(
        "--sharding", choices=("full", "sharded"), default="full", help="checkpoint_sharding"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores")
    if not args.only_throughput:
        with tempfile.TemporaryDirectory(dir=".") as folder:
            checkpoint_cost(args.params, Path(folder))
    work = Workload(0, 0, args.updates, args.every, args.threads, args.sharding)
    save_throughput(args.train_params, work, args.repeats)
    if not args.only_throughput:
        resume_cost(args.samples)


if __name__ == "__main__":
    main()
