"""What the defaults cost on small, fast epochs ("workload C"), in a terminal as users run it.

Workload: MLP 32-64-10, batch 32, 500 updates an epoch, 4 epochs, CPU, fp32, one thread,
AdamW lr 1e-3, clipping at 1.0. Loops, each in its own process whose stdout and stderr are a
pseudo-terminal (so progress bars draw as they do for a user), alternating, medians:

- "hand-written + tqdm": a careful loop (fused AdamW, no per-step sync) with a tqdm bar per
  epoch, its loss shown every 50 updates;
- "traineval lean": progress bar, logging records and checkpoint files off;
- "traineval defaults": as shipped (progress bar, metrics.jsonl records, last.pt and best.pt).

Reported: seconds (from the trainer's construction to its return; each loop's packages
imported and the data built before the clock),
and the ratios defaults / lean and defaults / hand-written, of the medians and paired
(each repeat's own ratio, the loops having run side by side) (the issue's target: >= 0.95,
speed ratios, so a ratio is the slower loop's time over the faster's inverted: lean seconds
over defaults seconds).

    .venv/bin/python benchmarks/bench_defaults_overhead.py [--repeats 5] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOOPS = ("hand-written + tqdm", "traineval lean", "traineval defaults")
UPDATES = 500


def _data(epochs: int) -> tuple[object, object]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(UPDATES * 32, 32, generator=generator)
    y = torch.randint(0, 10, (UPDATES * 32,), generator=generator)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return model, loader


def _hand_written(model, loader, epochs: int) -> None:  # type: ignore[no-untyped-def]
    import torch
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for epoch in range(epochs):
        running = torch.zeros(())
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}")
        for step, (x, y) in enumerate(bar, start=1):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(running) / step:.4f}")
        bar.close()


def _traineval(model, loader, epochs: int, lean: bool) -> None:  # type: ignore[no-untyped-def]
    from traineval import TrainingConfig, TrainingManager

    with tempfile.TemporaryDirectory(dir=".") as folder:
        settings = {
            "num_epochs": epochs,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "weight_decay": 0.0,
            "scheduler_type": "constant",
            "warmup_steps": 0,
            "tensorboard_logging": False,
            "output_dir": folder,
        }
        if lean:
            settings.update(
                progress_bar=False,
                verbose=False,
                log_frequency=10**9,
                save_best_model=False,
                save_last_checkpoint=False,
                checkpoint_save_frequency=0,
            )
        TrainingManager(TrainingConfig(**settings)).train(model, loader)


def run_one(loop: str, epochs: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import tqdm  # noqa: F401 - each loop's packages are imported before the clock

    import traineval.assembly.manager
    import traineval.modes  # noqa: F401

    model, loader = _data(epochs)
    warm = torch.nn.Linear(2, 2)
    torch.optim.AdamW(warm.parameters(), fused=True)  # first fused AdamW imports dynamo
    started = time.perf_counter()
    if loop == "hand-written + tqdm":
        _hand_written(model, loader, epochs)
    else:
        _traineval(model, loader, epochs, lean=loop == "traineval lean")
    Path(out).write_text(str(time.perf_counter() - started))


def _in_a_terminal(loop: str, epochs: int) -> float:
    """Run `loop` in a child process whose stdout and stderr are a pseudo-terminal."""
    master, slave = pty.openpty()
    drained = threading.Thread(target=_drain, args=(master,), daemon=True)
    drained.start()
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        command = [sys.executable, __file__, "--run", loop, "--epochs", str(epochs),
                   "--out", result.name]  # fmt: skip
        code = subprocess.run(command, stdout=slave, stderr=slave, check=False).returncode
        os.close(slave)
        if code != 0:
            raise RuntimeError(f"{loop} failed with exit code {code}")
        return float(Path(result.name).read_text())


def _drain(fd: int) -> None:
    """Read the terminal's output (and drop it), as a terminal would."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--run", choices=LOOPS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.epochs, args.out)
        return
    seconds: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for repeat in range(args.repeats):  # alternating, rotated: noise hits every loop alike
        order = LOOPS[repeat % 3 :] + LOOPS[: repeat % 3]
        for loop in order:
            seconds[loop].append(_in_a_terminal(loop, args.epochs))
    median = {loop: statistics.median(values) for loop, values in seconds.items()}
    print(
        f"Workload C: MLP 32-64-10, batch 32, {UPDATES} updates x {args.epochs} epochs, one "
        f"thread, in a pseudo-terminal; medians of {args.repeats}\n"
    )
    print("| loop | median s | speed vs traineval defaults |")
    print("|---|---|---|")
    for loop in LOOPS:
        print(
            f"| {loop} | {median[loop]:.3f} | {median['traineval defaults'] / median[loop]:.3f} |"
        )
    lean = median["traineval lean"] / median["traineval defaults"]
    hand = median["hand-written + tqdm"] / median["traineval defaults"]
    print(f"\ndefaults / lean speed: {lean:.3f}; defaults / hand-written + tqdm speed: {hand:.3f}")
    print(
        "paired (each repeat's own ratio; median, lowest-highest): defaults / lean "
        f"{_paired(seconds, 'traineval lean')}; defaults / hand-written + tqdm "
        f"{_paired(seconds, 'hand-written + tqdm')}"
    )


def _paired(seconds: dict[str, list[float]], other: str) -> str:
    """The speed ratio defaults / `other` within each repeat (the loops ran side by side, so
    a slow minute of the machine slows both), as median (lowest-highest)."""
    pairs = zip(seconds[other], seconds["traineval defaults"], strict=True)
    ratios = sorted(o / d for o, d in pairs)
    return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"


if __name__ == "__main__":
    main()
