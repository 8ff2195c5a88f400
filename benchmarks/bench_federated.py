"""FedAvg against FedProx and SCAFFOLD on label-skewed clients: digits, Dirichlet(0.1).

The demo's config (`traineval demo`: digits, the small CNN, AdamW 3e-3) as a federated run:
10 clients holding Dirichlet(0.1) label-skewed shares of the train split, every client in
every round, 20 rounds of `--local-epochs` local epochs, early stopping off; the best round
on validation is tested. Each seed draws the split of the rows, the clients' shares and the
initial weights. FedProx (`proximal_mu` > 0) adds `mu / 2 * ||w - w_global||^2` to each
client's loss; SCAFFOLD (`control_variates`) corrects each client's gradients by the server's
control minus the client's.

    .venv/bin/python benchmarks/bench_federated.py [--seeds 0,1,2]
        [--algorithms fedavg,fedprox:0.01,fedprox:0.1,scaffold] [--sgd LR] [--markdown FILE]

SCAFFOLD needs plain SGD clients (`--sgd 0.1`); with the demo's AdamW it is refused.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

import traineval
from traineval.commands.experiment import RunConfig, run_experiment


def test_accuracy(algorithm: str, seed: int, local_epochs: int, sgd: float | None) -> float:
    name, _, value = algorithm.partition(":")
    mu = float(value) if name == "fedprox" else 0.0
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            "mode=federated",
            "mode.clients=10",
            "mode.partition=dirichlet",
            "mode.dirichlet_alpha=0.1",
            f"mode.local_epochs={local_epochs}",
            f"mode.proximal_mu={mu}",
            f"mode.control_variates={'true' if name == 'scaffold' else 'false'}",
            "training.num_epochs=20",
            "training.warmup_steps=0",
            "training.early_stopping_patience=0",
            f"training.seed={seed}",
            f"data.split_seed={seed}",
            f"training.output_dir={folder}",
        ]
        if sgd is not None:  # plain SGD clients (SCAFFOLD's controls assume them)
            overrides += ["training.optimizer_type=sgd", f"training.learning_rate={sgd}"]
            overrides += ["training.momentum=0", "training.weight_decay=0"]
        result = run_experiment(RunConfig.from_yaml(demo, overrides))
        assert result.test_metrics is not None
        return float(result.test_metrics["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default="fedavg,fedprox:0.01,fedprox:0.1")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--sgd", type=float, default=None, help="plain SGD clients at this lr")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    names = {"fedavg": "FedAvg", "fedprox": "FedProx mu=", "scaffold": "SCAFFOLD"}
    for algorithm in args.algorithms.split(","):
        accuracy = [test_accuracy(algorithm, seed, args.local_epochs, args.sgd) for seed in seeds]
        kind, _, value = algorithm.partition(":")
        name = names[kind] + value
        spread = statistics.pstdev(accuracy) if len(accuracy) > 1 else 0.0
        rows.append(
            f"| {name} | {statistics.mean(accuracy):.4f} ± {spread:.4f} "
            f"({', '.join(f'{a:.4f}' for a in accuracy)}) |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"digits, 10 clients, Dirichlet(0.1), 20 rounds of {args.local_epochs} local epochs, "
            f"clients {'AdamW 3e-3' if args.sgd is None else f'SGD {args.sgd}'}, "
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
