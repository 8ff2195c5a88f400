"""FSDP checkpoints on 2 gloo ranks: each rank writing its part (`checkpoint_sharding:
sharded`, the default under FSDP) vs rank 0 gathering and writing the whole state (`full`),
beside a run that writes none.

Workload: an MLP of `--blocks` blocks of width `--width` (each block its own FSDP unit),
AdamW, batch 32 per rank, `--updates` updates with a checkpoint every `--every` (plus the
last), 1 thread per rank, traineval lean otherwise (no bar, no best checkpoint, no
validation). Each variant is its own torchrun launch, the variants alternating; reported:
the median training seconds (TrainingResult.train_seconds, rank 0), what the saves add per
save, and each rank's peak resident memory (ru_maxrss) above its peak without saves, which
shows where the state is gathered.

    .venv/bin/python benchmarks/bench_sharded_checkpoint.py [--repeats 3] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VARIANTS = ("none", "full", "sharded")


class Blocks(nn.Module):
    """`blocks` Linear+ReLU blocks in a ModuleList (FSDP shards each), then a head."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def worker(variant: str, args: argparse.Namespace, out: str) -> None:
    """One rank of one launch: train, then write rank 0's seconds and every rank's peak RSS."""
    from traineval import TrainingConfig, TrainingManager

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    n = args.updates * 32
    data = TensorDataset(
        torch.randn(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    with tempfile.TemporaryDirectory(dir=os.environ["BENCH_DIR"]) as folder:
        config = TrainingConfig(
            num_epochs=1,
            batch_size=32,
            learning_rate=1e-3,
            scheduler_type="constant",
            warmup_steps=0,
            distributed_strategy="fsdp",
            device="cpu",
            progress_bar=False,
            tensorboard_logging=False,
            verbose=False,
            log_frequency=10**9,
            save_best_model=False,
            early_stopping_patience=0,
            save_last_checkpoint=variant != "none",
            checkpoint_every_n_steps=args.every if variant != "none" else 0,
            checkpoint_sharding="full" if variant == "none" else variant,
            output_dir=folder,
        )
        result = TrainingManager(config).train(
            Blocks(args.width, args.blocks), DataLoader(data, batch_size=32)
        )
    rank = int(os.environ["RANK"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    record = {"seconds": result.train_seconds, "peak_mib": peak}
    with open(f"{out}-{rank}.json", "w") as handle:
        json.dump(record, handle)


def launch(variant: str, args: argparse.Namespace, folder: str) -> list[dict[str, float]]:
    """One torchrun launch of `variant` on 2 ranks; each rank's record."""
    out = os.path.join(folder, variant)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, "--worker", variant, "--out", out,
               "--width", str(args.width), "--blocks", str(args.blocks),
               "--updates", str(args.updates), "--every", str(args.every)]  # fmt: skip
    environment = {**os.environ, "BENCH_DIR": folder, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, capture_output=True)
    records = []
    for rank in (0, 1):
        with open(f"{out}-{rank}.json") as handle:
            records.append(json.load(handle))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--worker", choices=VARIANTS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args, args.out)
        return
    runs: dict[str, list[list[dict[str, float]]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for repeat in range(args.repeats):  # alternating, rotated
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
            for variant in order:
                runs[variant].append(launch(variant, args, folder))
    report(runs, args)


def report(runs: dict[str, list[list[dict[str, float]]]], args: argparse.Namespace) -> None:
    params = sum(p.numel() for p in Blocks(args.width, args.blocks).parameters())
    saves = args.updates // args.every + (args.updates % args.every != 0)
    seconds = {v: statistics.median(r[0]["seconds"] for r in runs[v]) for v in VARIANTS}
    peak = {v: [statistics.median(r[rank]["peak_mib"] for r in runs[v]) for rank in (0, 1)]
            for v in VARIANTS}  # fmt: skip
    print(
        f"FSDP on 2 gloo ranks ({platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}): {params / 1e6:.1f}M parameters ({params * 12 / 2**20:.0f} MiB of "
        f"weights and AdamW moments), {args.updates} updates, {saves} saves; medians of "
        f"{args.repeats}\n"
    )
    print("| checkpoints | train s | added per save (s) | rank 0 peak RSS above none | "
          "rank 1 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        added = (seconds[v] - seconds["none"]) / saves
        print(
            f"| {v} | {seconds[v]:.2f} | {added:+.3f} | {peak[v][0] - peak['none'][0]:+.0f} MiB "
            f"| {peak[v][1] - peak['none'][1]:+.0f} MiB |"
        )


if __name__ == "__main__":
    main()
