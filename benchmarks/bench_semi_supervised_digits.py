"""Semi-supervised digits with 5 labels per class: FixMatch, Mean Teacher, pseudo-labels.

scikit-learn's digits (8x8, 10 classes). For each seed: a stratified 30% test split; of the
rest, 5 rows per class keep their label (50 in all) and every other row is unlabeled. No
validation split (a user with 50 labels has none to spare): every run trains a fixed
budget and is scored with its final weights (the moving average where the run keeps one).

Runs, each through `TrainingManager.train` on the built-in `SmallCNN` (1x8x8 inputs):
- `supervised`: the 50 labeled rows only, same number of updates;
- `pseudo_label`, `fixmatch`, `mean_teacher`: `mode=SemiSupervised(algorithm=...)` on the
  labeled rows (repeated so that a batch holds about one labeled row in four, as FixMatch's
  labeled / unlabeled ratio) and the unlabeled ones, the built-in image augmentations;
- scikit-learn's `LabelSpreading` (kNN kernel) on the same split, the classical reference.

    .venv/bin/python benchmarks/bench_semi_supervised_digits.py [--seeds 0,1,2,3,4]
        [--runs supervised,fixmatch,...] [--epochs 60] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.semi_supervised import LabelSpreading
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.data.augment import ImageAugment
from traineval.models import SmallCNN
from traineval.modes import SemiSupervised

LABELS_PER_CLASS, BATCH = 5, 128


def split(seed: int) -> dict[str, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)
    labeled = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_train == c), LABELS_PER_CLASS, replace=False)
            for c in range(10)
        ]
    )
    hidden = np.full_like(y_train, -1)
    hidden[labeled] = y_train[labeled]
    return {"x": x_train, "y": hidden, "x_test": x_test, "y_test": y_test, "labeled": labeled}


def images(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).view(-1, 1, 8, 8)


def label_spreading(data: dict[str, np.ndarray]) -> float:
    model = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=100).fit(data["x"], data["y"])
    return float((model.predict(data["x_test"]) == data["y_test"]).mean())


def train_set(run: str, data: dict[str, np.ndarray]) -> TensorDataset:
    x, y = images(data["x"]), torch.as_tensor(data["y"])
    labeled = torch.as_tensor(data["labeled"])
    if run == "supervised":
        return TensorDataset(x[labeled], y[labeled])
    unlabeled = (y == -1).nonzero()[:, 0]
    repeat = max(1, round(len(unlabeled) / 3 / len(labeled)))  # about 1 labeled in 4
    rows = torch.cat([labeled.repeat(repeat), unlabeled])
    return TensorDataset(x[rows], y[rows])


def accuracy(run: str, seed: int, data: dict[str, np.ndarray], args: argparse.Namespace) -> float:
    if run == "label_spreading":
        return label_spreading(data)
    dataset = train_set(run, data)
    updates = args.epochs * len(train_set("fixmatch", data)) // BATCH
    epochs = max(1, updates * BATCH // len(dataset)) if run == "supervised" else args.epochs
    mode: SemiSupervised | str = "supervised"
    if run != "supervised":
        mode = SemiSupervised(
            algorithm=run,
            augmentation=None if run == "pseudo_label" else "image",
            image_shape=None,
            unlabeled_weight=args.consistency if run == "mean_teacher" else 1.0,
            rampup_steps=updates // 4 if run == "mean_teacher" else 0,
            weak_augmentation=ImageAugment("strong")
            if run == "mean_teacher" and args.teacher_noise == "strong"
            else None,
        )
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, (8, 8))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=min(BATCH, len(dataset)), shuffle=True, generator=generator
    )
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=epochs,
            learning_rate=args.lr,
            optimizer_type="adamw",
            weight_decay=5e-4,
            scheduler_type="cosine",
            warmup_steps=0,
            early_stopping_patience=0,
            ema_decay=0.99 if run != "supervised" else 0.0,
            seed=seed,
            output_dir=folder,
            tensorboard_logging=False,
            progress_bar=False,
            save_best_model=False,
            log_frequency=10_000,
        )
        TrainingManager(config).train(model, loader, mode=mode)
    model.eval()
    with torch.no_grad():
        predicted = model(images(data["x_test"])).argmax(1).numpy()
    return float((predicted == data["y_test"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument(
        "--runs", default="supervised,label_spreading,pseudo_label,mean_teacher,fixmatch"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--consistency", type=float, default=30.0)
    parser.add_argument("--teacher-noise", default="strong", choices=["weak", "strong"])
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = args.runs.split(",")
    results: dict[str, list[float]] = {run: [] for run in runs}
    for seed in seeds:
        data = split(seed)
        for run in runs:
            started = time.perf_counter()
            results[run].append(accuracy(run, seed, data, args))
            seconds = time.perf_counter() - started
            print(f"seed {seed} {run:16s} {results[run][-1]:.4f} ({seconds:.0f} s)", flush=True)
    lines = ["| method | test accuracy, mean ± sd | per seed |", "|---|---|---|"]
    for run, values in results.items():
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {run} | {statistics.mean(values):.4f} ± {spread:.4f} | {per_seed} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
