"""Checkpoint cost and mid-epoch resume cost.

1. Save and load time of a full training checkpoint (weights + AdamW state, atomic write
   with fsync, weights_only load) for a ~100M-parameter model.
2. Resume overhead: time to skip to the middle of a 1,000,000-sample shuffled epoch, and
   proof that no skipped sample is read.

    .venv/bin/python benchmarks/bench_checkpoint.py [--params 100e6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from traineval.checkpoint import load_checkpoint_file, save_checkpoint_file
from traineval.data.position import skip_batches


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
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=".") as folder:
        checkpoint_cost(args.params, Path(folder))
    resume_cost(args.samples)


if __name__ == "__main__":
    main()
