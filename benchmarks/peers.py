"""traineval against what users would pick instead, on identical workloads, side by side.

Workloads (CPU, fp32, one thread, AdamW lr 1e-3, clipping at 1.0, constant LR, same seed,
model and data): (A) overhead-bound MLP 32-64-10, batch 32, 2,000 updates; (B) compute-bound
small CNN on 3x32x32 inputs, batch 64, 100 updates. Loops: a hand-written loop, naive
(`loss.item()` every step) and careful (fused AdamW, no per-step sync); traineval with its
defaults (progress bar, metrics.jsonl, checkpoints) and lean; PyTorch Lightning default
(progress bar, per-step `self.log`, logger, checkpointing) and lean (all off); a Hugging Face
Accelerate loop. Each run is its own process; runs alternate; the table reports medians and
the ratio to the careful loop. Each framework is imported before the clock starts; import
times are measured apart (`--imports`: each package in a fresh process after torch).
Peers come from the `bench` extra and are skipped with a
message when absent.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python benchmarks/peers.py [--repeats 3] [--markdown benchmarks/results/peers.md]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORKLOADS = {
    "A": {"steps": 2000, "batch": 32, "shape": (32,), "label": "MLP 32-64-10, batch 32"},
    "B": {"steps": 100, "batch": 64, "shape": (3, 32, 32), "label": "CNN 3x32x32, batch 64"},
}
PEERS = {"lightning": "lightning", "accelerate": "accelerate"}


def make_model(workload: str) -> nn.Module:
    torch.manual_seed(0)
    if workload == "A":
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    return small_cnn()


def small_cnn() -> nn.Module:
    """Workload B's CNN (3x32x32 in, 10 classes); the GPU and DDP benchmarks use it too."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )


def make_loader(workload: str) -> DataLoader:
    spec = WORKLOADS[workload]
    n = spec["steps"] * spec["batch"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, *spec["shape"], generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=spec["batch"],
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )


def raw(model: nn.Module, loader: DataLoader, careful: bool) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=careful or None)
    running = torch.zeros(())
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if careful:
            running += loss.detach()
        else:
            running += loss.item()  # the naive loop reads the loss every step
    float(running)


def with_traineval(model: nn.Module, loader: DataLoader, lean: bool, bar: bool = True) -> None:
    from traineval import TrainingConfig, TrainingManager

    with tempfile.TemporaryDirectory() as folder:
        settings: dict[str, Any] = {
            "num_epochs": 1,
            "learning_rate": 1e-3,
            "weight_decay": 0.0,
            "scheduler_type": "constant",
            "warmup_steps": 0,
            "output_dir": folder,
            "tensorboard_logging": False,
            "batch_size": loader.batch_size,
        }
        if lean:
            settings.update(
                progress_bar=False,
                log_frequency=10**9,
                save_best_model=False,
                save_last_checkpoint=False,
                checkpoint_save_frequency=0,
            )
        else:
            settings.update(progress_bar=bar)
        TrainingManager(TrainingConfig(**settings)).train(model, loader)


def with_lightning(model: nn.Module, loader: DataLoader, lean: bool) -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            if not lean:
                self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    with tempfile.TemporaryDirectory() as folder:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "gradient_clip_val": 1.0,
            "default_root_dir": folder,
        }
        if lean:
            options.update(
                enable_progress_bar=False,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            )
        L.Trainer(**options).fit(Module(), loader)


def with_accelerate(model: nn.Module, loader: DataLoader) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    running = torch.zeros(())
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
    float(running)


LOOPS: dict[str, tuple[str | None, Callable[[nn.Module, DataLoader], None]]] = {
    "hand-written naive": (None, lambda m, d: raw(m, d, careful=False)),
    "hand-written careful": (None, lambda m, d: raw(m, d, careful=True)),
    "traineval defaults": (None, lambda m, d: with_traineval(m, d, lean=False)),
    "traineval lean": (None, lambda m, d: with_traineval(m, d, lean=True)),
    "Lightning default": ("lightning", lambda m, d: with_lightning(m, d, lean=False)),
    "Lightning lean": ("lightning", lambda m, d: with_lightning(m, d, lean=True)),
    "Accelerate loop": ("accelerate", with_accelerate),
}


def run_one(loop: str, workload: str) -> None:
    torch.set_num_threads(1)
    loader = make_loader(workload)
    warm = make_model(workload)  # first fused optimizer imports torch._dynamo: not timed
    torch.optim.AdamW(warm.parameters(), fused=True)
    model = make_model(workload)
    package, function = LOOPS[loop]
    # Imports are start-up, reported on their own (`--imports`), not part of the loop's time.
    importlib.import_module(package or ("traineval" if "traineval" in loop else "torch"))
    started = time.perf_counter()
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
    ):
        function(model, loader)
    print(time.perf_counter() - started)


def report_imports(repeats: int) -> None:
    """Seconds to import each package in a fresh process that has imported torch already."""
    code = (
        "import time, importlib, torch; t = time.perf_counter(); "
        "importlib.import_module('{}'); print(time.perf_counter() - t)"
    )
    print("| package | import s after torch (median) |")
    print("|---|---|")
    for package in ("traineval", *PEERS.values()):
        if importlib.util.find_spec(package) is None:
            continue
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code.format(package)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(repeats)
        ]
        print(f"| {package} | {statistics.median(times):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="AB")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--loops", help="comma-separated subset of the loops (default: all)")
    parser.add_argument("--imports", action="store_true", help="time importing each package")
    parser.add_argument("--run", nargs=2, metavar=("LOOP", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(*args.run)
        return
    if args.imports:
        report_imports(args.repeats)
        return
    available = {}
    chosen = args.loops.split(",") if args.loops else list(LOOPS)
    for loop, (package, _) in LOOPS.items():
        if loop not in chosen:
            available[loop] = False
            continue
        available[loop] = package is None or importlib.util.find_spec(package) is not None
        if not available[loop]:
            print(f"skipping {loop}: {package} is not installed (pip install -e '.[bench]')")
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in PEERS.values():
        if importlib.util.find_spec(package) is not None:
            versions.append(f"{package} {__import__(package).__version__}")
    lines = [
        f"{', '.join(versions)}; {platform.machine()}, {os.cpu_count()} cores, 1 torch thread, "
        f"{args.repeats} runs per loop (each its own process, alternating), medians",
        "",
        "| workload | loop | median s | steps/s | ratio to careful loop |",
        "|---|---|---|---|---|",
    ]
    for workload in args.workloads:
        loops = [loop for loop in LOOPS if available[loop]]
        times: dict[str, list[float]] = {loop: [] for loop in loops}
        for repeat in range(args.repeats):
            for loop in loops if repeat % 2 == 0 else reversed(loops):
                command = [sys.executable, __file__, "--run", loop, workload]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                times[loop].append(float(out.split()[-1]))
        steps = WORKLOADS[workload]["steps"]
        careful = statistics.median(times["hand-written careful"])
        for loop in loops:
            median = statistics.median(times[loop])
            lines.append(
                f"| {workload}: {WORKLOADS[workload]['label']} | {loop} | {median:.3f} | "
                f"{steps / median:.0f} | {careful / median:.3f} |"
            )
    emit(lines, args.markdown)


def emit(lines: list[str], markdown: Path | None) -> None:
    """Print the table; also write it to `markdown` when given."""
    table = "\n".join(lines)
    print(table)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
