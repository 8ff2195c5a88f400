"""MAML on sine regression (Finn et al., 2017): traineval against a hand-written torch.func +
vmap loop, side by side in one process.

The workload of the MAML paper: a 1-40-40-1 ReLU net; each task is a sine wave with
amplitude in [0.1, 5] and phase in [0, pi], K=10 support and 10 query points in [-5, 5]; one
inner SGD step at 0.01; 25 tasks per meta-batch; Adam at 1e-3. Both loops draw the same
tasks (one generator per task index) and start from the same weights. After training, each
is scored on the same 2,000 fresh tasks: the query MSE after one adaptation step ("1-step
MSE"; the paper's 10-shot curve is near 0.5 at 70k iterations, 0.47-0.53 here at 10k).

    .venv/bin/python benchmarks/bench_maml_sine.py [--iterations 10000] [--seeds 0,1,2]
        [--markdown FILE]

Seconds are wall time of the training alone (the loop, its data), and CPU seconds of the
process beside them: this 2-core VM is shared, so wall time moves with the neighbours.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from traineval import TrainingConfig, TrainingManager
from traineval.modes import MetaLearning

K, TASKS, INNER_LR, OUTER_LR = 10, 25, 0.01, 1e-3


class SineTasks(Dataset[tuple[torch.Tensor, ...]]):
    """Task i: a sine wave drawn from generator seed (seed, i); support and query points."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        amplitude = torch.empty(()).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(()).uniform_(0.0, math.pi, generator=g)
        x = torch.empty(2 * K, 1).uniform_(-5.0, 5.0, generator=g)
        y = amplitude * torch.sin(x - phase)
        return x[:K], y[:K], x[K:], y[K:]


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def hand_written(model: nn.Module, loader: DataLoader[Any]) -> None:
    """The reference: torch.func.grad for the inner step, vmap over the meta-batch's tasks."""
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=OUTER_LR)

    def loss(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(functional_call(model, weights, (x,)), y)

    def query_loss(weights, sx, sy, qx, qy):  # type: ignore[no-untyped-def]
        step = grad(loss)(weights, sx, sy)
        fast = {name: w - INNER_LR * step[name] for name, w in weights.items()}
        return loss(fast, qx, qy)

    for sx, sy, qx, qy in loader:
        losses = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()


def with_traineval(model: nn.Module, loader: DataLoader[Any], folder: str) -> None:
    config = TrainingConfig(
        num_epochs=1,
        learning_rate=OUTER_LR,
        optimizer_type="adam",
        weight_decay=0.0,
        scheduler_type="constant",
        warmup_steps=0,
        gradient_clipping=False,
        early_stopping_patience=0,
        save_best_model=False,
        save_last_checkpoint=False,
        checkpoint_save_frequency=0,
        tensorboard_logging=False,
        progress_bar=False,
        log_frequency=500,
        device="cpu",
        output_dir=folder,
    )
    TrainingManager(config).train(
        model,
        loader,
        loss_function=nn.MSELoss(),
        mode=MetaLearning(algorithm="maml", inner_lr=INNER_LR, inner_steps=1),
    )


def one_step_mse(model: nn.Module, tasks: int = 2000) -> float:
    """Query MSE after one inner step on each of `tasks` fresh tasks (seed 999)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = 0.0
    for sx, sy, qx, qy in DataLoader(SineTasks(tasks, seed=999), batch_size=100):
        for t in range(sx.shape[0]):
            weights = {k: v.clone().requires_grad_() for k, v in params.items()}
            loss = nn.functional.mse_loss(functional_call(model, weights, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(weights.values()))
            fast = {k: w - INNER_LR * g for (k, w), g in zip(weights.items(), grads, strict=True)}
            with torch.no_grad():
                total += float(
                    nn.functional.mse_loss(functional_call(model, fast, (qx[t],)), qy[t])
                )
    return total / tasks


def run(name: str, seed: int, iterations: int) -> tuple[float, float, float]:
    model = net(seed)
    loader = DataLoader(SineTasks(iterations * TASKS, seed=seed), batch_size=TASKS)
    started, cpu = time.perf_counter(), time.process_time()
    if name == "hand-written (torch.func + vmap)":
        hand_written(model, loader)
    else:
        with tempfile.TemporaryDirectory() as folder:
            with_traineval(model, loader, folder)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu_seconds, one_step_mse(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in ("hand-written (torch.func + vmap)", "traineval MetaLearning(maml)"):
        results = [run(name, seed, args.iterations) for seed in seeds]
        wall = [r[0] for r in results]
        cpu = [r[1] for r in results]
        mse = [r[2] for r in results]
        spread = statistics.pstdev(mse) if len(mse) > 1 else 0.0
        rows.append(
            f"| {name} | {statistics.mean(wall):.1f} ({', '.join(f'{w:.1f}' for w in wall)}) "
            f"| {statistics.mean(cpu):.1f} | {1000 * statistics.mean(wall) / args.iterations:.2f} "
            f"| {statistics.mean(mse):.3f} ± {spread:.3f} ({', '.join(f'{m:.3f}' for m in mse)}) |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"MAML sine, {args.iterations} meta-iterations of {TASKS} tasks, seeds {args.seeds}, "
            f"torch {torch.__version__}, one thread",
            "",
            "| loop | wall s (per seed) | CPU s | ms per iteration "
            "| 1-step MSE, 2,000 fresh tasks |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
