"""FedAvg against FedProx on label-skewed clients: digits, Dirichlet(0.1), several seeds.

The demo's config (`traineval demo`: digits, the small CNN, AdamW 3e-3) as a federated run:
10 clients holding Dirichlet(0.1) label-skewed shares of the train split, every client in
every round, 20 rounds of `--local-epochs` local epochs, early stopping off; the best round
on validation is tested. Each seed draws the split of the rows, the clients' shares and the
initial weights. FedProx (`proximal_mu` > 0) adds `mu / 2 * ||w - w_global||^2` to each
client's loss.

    .venv/bin/python benchmarks/bench_federated.py [--seeds 0,1,2] [--mus 0,0.01,0.1]
        [--markdown FILE]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

import traineval
from traineval.experiment import RunConfig, run_experiment


def test_accuracy(mu: float, seed: int, local_epochs: int) -> float:
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            "mode=federated",
            "mode.clients=10",
            "mode.partition=dirichlet",
            "mode.dirichlet_alpha=0.1",
            f"mode.local_epochs={local_epochs}",
            f"mode.proximal_mu={mu}",
            "training.num_epochs=20",
            "training.warmup_steps=0",
            "training.early_stopping_patience=0",
            f"training.seed={seed}",
            f"data.split_seed={seed}",
            f"training.output_dir={folder}",
        ]
        result = run_experiment(RunConfig.from_yaml(demo, overrides))
        assert result.test_metrics is not None
        return float(result.test_metrics["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mus", default="0,0.01,0.1")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for mu in (float(m) for m in args.mus.split(",")):
        accuracy = [test_accuracy(mu, seed, args.local_epochs) for seed in seeds]
        name = "FedAvg" if mu == 0 else f"FedProx mu={mu:g}"
        spread = statistics.pstdev(accuracy) if len(accuracy) > 1 else 0.0
        rows.append(
            f"| {name} | {statistics.mean(accuracy):.4f} ± {spread:.4f} "
            f"({', '.join(f'{a:.4f}' for a in accuracy)}) |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"digits, 10 clients, Dirichlet(0.1), 20 rounds of {args.local_epochs} local epochs, "
            f"seeds {args.seeds}, torch {torch.__version__}",
            "",
            "| algorithm | test accuracy, best round on validation |",
            "|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
