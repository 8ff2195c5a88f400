"""A training process for the kill -9 tests:
`python resume_worker.py OUTPUT_DIR WORKERS [WRITER]` (WRITER: sync, thread or process).

Trains with a checkpoint after every optimizer update, resuming from the newest valid
checkpoint in OUTPUT_DIR, and writes the final weights to OUTPUT_DIR/final.pt.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import Callback, TrainingConfig, TrainingManager


class Announce(Callback):
    def on_train_start(self, loop):
        print(f"training from step {loop.state.global_step}", flush=True)


class Pace(Callback):
    """At least 20 ms an update: the test's kills (0.05-0.6 s after start) land mid-run on a
    fast machine too, so every run is cut at least twice before it can finish."""

    def on_step_end(self, loop):
        time.sleep(0.02)


def main() -> None:
    output_dir, workers = sys.argv[1], int(sys.argv[2])
    writer = sys.argv[3] if len(sys.argv) > 3 else "sync"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=generator)
    y = (x[:, :4].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=8,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(1),
    )
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    config = TrainingConfig(
        num_epochs=4,
        batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=5,
        checkpoint_every_n_steps=1,
        eval_frequency=15,
        log_frequency=1,
        early_stopping_patience=0,
        output_dir=output_dir,
        progress_bar=False,
        tensorboard_logging=False,
        device="cpu",
        seed=5,
        async_checkpointing=writer != "sync",
        checkpoint_writer=writer if writer in ("thread", "process") else "thread",
        checkpoint_sharding="sharded" if writer == "sharded" else "auto",
    )
    callbacks = [Announce(), Pace()]
    TrainingManager(config).train(model, loader, val, resume_from="auto", callbacks=callbacks)
    torch.save(model.state_dict(), f"{output_dir}/final.pt")
    print("finished", flush=True)


if __name__ == "__main__":
    main()
