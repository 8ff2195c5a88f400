"""Evaluator cost: bounded memory and throughput against a hand-written inference loop.

1. Peak memory (RSS) of evaluating N samples x 100 classes with save_predictions off, for
   N = 100,000 and 1,000,000, each in a fresh process. Batches are generated on the fly,
   so the data itself takes no memory: what grows would be the evaluator's.
2. Throughput of `Evaluator.evaluate_model` against a hand-written `torch.inference_mode()`
   loop computing the same metrics, alternating in one process, same batches: loss and
   accuracy alone, and the default set (loss, accuracy, precision / recall / F1, confusion
   matrix, log loss, top-5).

    .venv/bin/python benchmarks/bench_evaluation.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from traineval import EvaluationConfig, Evaluator

CLASSES = 100
BATCH = 1000


class OnTheFly:
    """`n` samples in batches made on demand from a seeded generator (nothing is stored)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for start in range(0, self.n, BATCH):
            size = min(BATCH, self.n - start)
            x = torch.randn(size, CLASSES, generator=generator)
            yield x, torch.randint(0, CLASSES, (size,), generator=generator)


def peak_memory(n: int) -> None:
    torch.manual_seed(0)
    model = nn.Linear(CLASSES, CLASSES)
    metrics = Evaluator().evaluate_model(model, OnTheFly(n))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} {peak_mib:.1f} {metrics['accuracy']:.4f}")


def hand_written(model: nn.Module, batches: list, full: bool) -> float:
    """What a careful user writes: loss and accuracy, or (full) the same metric set as ours."""
    started = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    confusion = torch.zeros(CLASSES * CLASSES, dtype=torch.int64)
    top5 = torch.zeros((), dtype=torch.int64)
    count = 0
    model.eval()
    with torch.inference_mode():
        for x, y in batches:
            out = model(x)
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
            predicted = out.argmax(1)
            correct += (predicted == y).sum()
            if full:  # log loss is the summed cross-entropy already
                confusion += torch.bincount(y * CLASSES + predicted, minlength=CLASSES**2)
                top5 += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            count += len(y)
    _ = (loss_sum / count).item(), correct.item() / count, confusion.sum().item(), top5.item()
    return time.perf_counter() - started


def ours(model: nn.Module, batches: list, full: bool) -> float:
    config = EvaluationConfig() if full else EvaluationConfig(classification_metrics=["accuracy"])
    started = time.perf_counter()
    Evaluator(config).evaluate_model(model, batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.peak_memory:
        peak_memory(args.peak_memory)
        return
    print(f"torch {torch.__version__}; {CLASSES} classes, batches of {BATCH}")
    print("\n| samples | peak RSS (MiB) | accuracy |\n|---|---|---|")
    for n in (100_000, 1_000_000):
        command = [sys.executable, __file__, "--peak-memory", str(n)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        count, peak, accuracy = out.split()
        print(f"| {int(count):,} | {float(peak):.1f} | {accuracy} |")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(CLASSES, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    batches = list(OnTheFly(200 * BATCH))
    print("\n| 200,000 samples, MLP 100-256-100, 1 thread | hand-written s | Evaluator s | ratio |")
    print("|---|---|---|---|")
    for full, label in (
        (False, "loss + accuracy"),
        (True, "loss, accuracy, P/R/F1, confusion, log loss, top-5"),
    ):
        hand_written(model, batches, full)
        ours(model, batches, full)
        raw_times, our_times = [], []
        for _ in range(args.repeats):
            raw_times.append(hand_written(model, batches, full))
            our_times.append(ours(model, batches, full))
        raw, mine = statistics.median(raw_times), statistics.median(our_times)
        print(f"| {label} | {raw:.3f} | {mine:.3f} | {raw / mine:.3f} |")


if __name__ == "__main__":
    main()
