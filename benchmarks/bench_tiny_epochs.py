"""Checkpoint cadence on many tiny epochs: traineval's defaults vs checkpointing off.

Workload: MLP 8-16-3, 32 training samples in batches of 8 (4 updates an epoch), a
validation split of 16 each epoch, 1,000 epochs, CPU, fp32, no progress bar. The defaults
write `best.pt` when validation improves and keep `last.pt` current at epoch ends within a
time budget; "off" writes no checkpoint at all. The runs alternate in one process (off,
defaults, defaults, off, ...), and the ratio of the median times is reported.

    .venv/bin/python benchmarks/bench_tiny_epochs.py [--epochs 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager


def _data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, :3]).argmax(dim=1))


def run(epochs: int, checkpoints: bool) -> tuple[float, int]:
    """Seconds for one run, and how many checkpoint files it wrote."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    train = DataLoader(_data(32, 0), batch_size=8, shuffle=True)
    val = DataLoader(_data(16, 1), batch_size=16)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=epochs,
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=0,
            scheduler_type="constant",
            early_stopping_patience=0,
            progress_bar=False,
            tensorboard_logging=False,
            device="cpu",
            output_dir=folder,
            save_best_model=checkpoints,
            save_last_checkpoint=checkpoints,
        )
        started = time.perf_counter()
        result = TrainingManager(config).train(model, train, val)
        seconds = time.perf_counter() - started
        assert result["global_step"] == 4 * epochs
    return seconds, len(result["checkpoints"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(20, True)  # warm up imports and kernels
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for checkpoints in (False, True) if i % 2 == 0 else (True, False):
            seconds, _ = run(args.epochs, checkpoints)
            times[checkpoints].append(seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.epochs} epochs x 4 updates, medians of {args.repeats}:")
    print(f"  checkpointing off  {off:7.2f} s")
    print(f"  defaults           {on:7.2f} s")
    print(f"  defaults / off     {on / off:7.3f}")


if __name__ == "__main__":
    main()
