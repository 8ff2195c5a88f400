"""Checkpoint cadence on many tiny epochs: traineval's defaults vs checkpointing off.

Workload: MLP 8-16-3, 32 training samples in batches of 8 (4 updates an epoch), a
validation split of 16 each epoch, 1,000 epochs, CPU, fp32, no progress bar. Four settings,
each as a ratio to "off" (no checkpoint file at all):

- "last.pt": `last.pt` kept current at epoch ends, within the write budget;
- "best + last": also `best.pt` when validation improves (here most epochs): copied at once
  when over budget, written within it;
- "defaults": also an `epoch-NNNN.pt` every 5 epochs (`checkpoint_save_frequency: 5`), files
  the user asked to keep, written when asked: 200 of them here.

The settings take turns in one process (rotated each repeat) and medians are reported.

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


SETTINGS = {  # name -> (save_best_model, save_last_checkpoint, checkpoint_save_frequency)
    "off": (False, False, 0),
    "last.pt": (False, True, 0),
    "best + last": (True, True, 0),
    "defaults": (True, True, 5),
}


def run(epochs: int, setting: str) -> tuple[float, int]:
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
            save_best_model=SETTINGS[setting][0],
            save_last_checkpoint=SETTINGS[setting][1],
            checkpoint_save_frequency=SETTINGS[setting][2],
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
    run(20, "defaults")  # warm up imports and kernels
    names = list(SETTINGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    files: dict[str, int] = {}
    for i in range(args.repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds, files[name] = run(args.epochs, name)
            times[name].append(seconds)
    off = statistics.median(times["off"])
    print(f"{args.epochs} epochs x 4 updates, medians of {args.repeats}:")
    for name in names:
        median = statistics.median(times[name])
        print(f"  {name:12s} {median:7.2f} s  {median / off:6.3f} x off  ({files[name]} files)")


if __name__ == "__main__":
    main()
