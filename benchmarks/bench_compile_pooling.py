"""Why a compiled CNN can be slower than eager: max pooling against average pooling.

Workload B's CNN (`peers.small_cnn`, two conv + ReLU + 2x2 max-pool stages) trained with
fused AdamW, eager and through `torch.compile`, then the same CNN with 2x2 average pooling.
The four models are compiled and warmed up first, then timed in alternating windows; the
table shows median milliseconds per update.

    python benchmarks/bench_compile_pooling.py --device cpu --batch 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peers import small_cnn


def build(pool: str, compiled: bool, batch: int, device: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = small_cnn()
    if pool == "avg":
        model[2], model[5] = nn.AvgPool2d(2), nn.AvgPool2d(2)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="updates per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    variants = {
        (pool, compiled): build(pool, compiled, args.batch, args.device)
        for pool in ("max", "avg")
        for compiled in (False, True)
    }
    for step in variants.values():  # compile and warm up
        for _ in range(3):
            step()
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for key in order:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                variants[key]()
            sync()
            times[key].append((time.perf_counter() - start) / args.steps * 1000)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, {args.repeats} windows of "
        f"{args.steps} updates, medians"
    )
    print()
    print("| pooling | eager ms/update | compiled ms/update | compiled / eager time |")
    print("|---|---|---|---|")
    for pool in ("max", "avg"):
        eager = statistics.median(times[(pool, False)])
        compiled = statistics.median(times[(pool, True)])
        print(f"| {pool} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.2f} |")


if __name__ == "__main__":
    main()
