"""Few-shot digits: Prototypical Networks through traineval, 5-way 1-shot, several seeds.

scikit-learn's digits (10 classes, 8x8). Two splits:
- `rows`: every class in training and test, the test tasks drawn from held-out rows (30%,
  by seed); the setting of the 96.9-97.1% reference and of MAML's 96.4% in issue #17.
- `classes`: 5 classes (drawn by seed) train, the other 5 make the test tasks: unseen
  classes, with only five to learn an embedding from.

Each run: an embedding (`--embedding mlp`: 64-256-128-64; `conv`: three 3x3 conv blocks of 64
channels with batch norm, two 2x2 poolings), 1,000 updates of 8 tasks (5-way 1-shot, 15
queries per class), Adam 1e-3, through `TrainingManager.train(mode=MetaLearning(algorithm=
"protonet"))`; scored by the mode on 600 test tasks (query accuracy). Beside it, the same
test tasks scored on raw pixels (no training: the prototype of one pixel vector per class),
the floor an embedding must beat.

    .venv/bin/python benchmarks/bench_fewshot_digits.py [--seeds 0,1,2] [--embedding mlp]
        [--splits rows,classes] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.data import Episodes
from traineval.modes import MetaLearning

WAYS, SHOTS, QUERIES, UPDATES, TASKS = 5, 1, 15, 1000, 8


def splits(kind: str, seed: int) -> tuple[TensorDataset, TensorDataset]:
    pixels, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(pixels / 16, dtype=torch.float32), torch.tensor(labels)
    rng = np.random.default_rng(seed)
    if kind == "rows":
        order = torch.as_tensor(rng.permutation(len(y)))
        cut = int(0.7 * len(y))
        train, test = order[:cut], order[cut:]
    else:
        classes = torch.as_tensor(rng.permutation(10)[:5])
        train_rows = torch.isin(y, classes)
        train, test = train_rows.nonzero()[:, 0], (~train_rows).nonzero()[:, 0]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def embedding(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)
        )
    blocks: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
    for index, channels in enumerate((1, 64, 64)):
        blocks += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
        blocks += [nn.MaxPool2d(2)] if index else []
    return nn.Sequential(*blocks, nn.Flatten())


def pixels(kind: str, seed: int) -> float:
    """The test tasks scored on raw pixels: what an embedding must beat."""
    test = splits(kind, seed)[1]
    test_tasks = Episodes(test, WAYS, SHOTS, QUERIES, episodes=600, seed=seed + 100)
    mode = MetaLearning(algorithm="protonet")
    scored = mode.score(nn.Identity(), DataLoader(test_tasks, batch_size=50), torch.device("cpu"))
    assert scored is not None
    return float(scored["accuracy"])


def run(kind: str, seed: int, embedding_kind: str) -> tuple[float, float]:
    train, test = splits(kind, seed)
    torch.manual_seed(seed)
    encoder = embedding(embedding_kind)
    tasks = Episodes(train, WAYS, SHOTS, QUERIES, episodes=UPDATES * TASKS, seed=seed)
    test_tasks = Episodes(test, WAYS, SHOTS, QUERIES, episodes=600, seed=seed + 100)
    mode = MetaLearning(algorithm="protonet")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=1,
            learning_rate=1e-3,
            optimizer_type="adam",
            weight_decay=0.0,
            scheduler_type="constant",
            warmup_steps=0,
            gradient_clipping=False,
            early_stopping_patience=0,
            save_best_model=False,
            tensorboard_logging=False,
            progress_bar=False,
            device="cpu",
            seed=seed,
            output_dir=folder,
        )
        TrainingManager(config).train(
            encoder, DataLoader(tasks, batch_size=TASKS, shuffle=True), mode=mode
        )
    seconds = time.perf_counter() - started
    scored = mode.score(encoder, DataLoader(test_tasks, batch_size=50), torch.device("cpu"))
    assert scored is not None
    return float(scored["accuracy"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--embedding", choices=("mlp", "conv"), default="mlp")
    parser.add_argument("--splits", default="rows,classes")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for kind in args.splits.split(","):
        results = [run(kind, seed, args.embedding) for seed in seeds]
        floor = statistics.mean(pixels(kind, seed) for seed in seeds)
        accuracy = [r[0] for r in results]
        spread = statistics.pstdev(accuracy) if len(accuracy) > 1 else 0.0
        rows.append(
            f"| {kind} | {statistics.mean(accuracy):.4f} ± {spread:.4f} "
            f"({', '.join(f'{a:.4f}' for a in accuracy)}) | {floor:.4f} "
            f"| {statistics.mean(r[1] for r in results):.1f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Prototypical Networks ({args.embedding} embedding), digits 5-way 1-shot, seeds "
            f"{args.seeds}, {UPDATES} updates of {TASKS} tasks, torch {torch.__version__}, "
            "one thread",
            "",
            "| test tasks from | query accuracy, 600 test tasks | raw pixels | train s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
