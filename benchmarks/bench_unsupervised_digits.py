"""Representation learning on digits: autoencoder and VAE, a hand-written loop beside.

scikit-learn's digits (64 pixels / 16), a stratified 30% test split per seed. Every run
trains the built-in MLP models with an 8-d code (64-64-8 encoder, mirrored decoder) for a
fixed budget, then reports the test reconstruction MSE and the linear probe (a logistic
regression fitted on the train codes, scored on the test codes:
`traineval.evaluation.probe.linear_probe`):

- `hand-written AE`: the autoencoder in a plain PyTorch loop (Adam, batch 64, MSE);
- `traineval AE`: the same settings through `TrainingManager.train(mode="unsupervised")`
  (constant rate, no warmup: the same updates);
- `traineval AE defaults`: traineval's defaults (AdamW with weight decay 0.01, 100 warmup
  updates, cosine decay to 0, gradient clipping at 1.0);
- `traineval VAE`: `Unsupervised(objective="elbo", beta=...)` on the built-in `VAE`, its
  code the posterior mean.

    .venv/bin/python benchmarks/bench_unsupervised_digits.py [--seeds 0,1,2] [--epochs 200]
        [--hidden 128] [--lr 3e-3] [--output sigmoid]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.evaluation.probe import linear_probe
from traineval.models import VAE, Autoencoder
from traineval.modes import Unsupervised

BATCH = 64


def split(seed: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16).astype(np.float32), y, test_size=0.3, stratify=y, random_state=seed
    )
    return (
        TensorDataset(torch.as_tensor(x_train), torch.as_tensor(y_train)),
        TensorDataset(torch.as_tensor(x_test), torch.as_tensor(y_test)),
    )


def scores(
    model: torch.nn.Module, train: TensorDataset, test: TensorDataset
) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(test.tensors[0])
        reconstruction = out["reconstruction"] if isinstance(out, dict) else out
        mse = float(((reconstruction - test.tensors[0]) ** 2).mean())
    probe = linear_probe(model, DataLoader(train, 256), DataLoader(test, 256))
    return mse, probe["probe_accuracy"]


def hand_written(seed: int, train: TensorDataset, args: argparse.Namespace) -> torch.nn.Module:
    epochs, lr = args.epochs, args.lr
    torch.manual_seed(seed)
    model = Autoencoder(
        64, hidden_sizes=tuple(args.hidden), latent_dim=8, output_activation=args.output
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(train, BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, _y in loader:
            loss = torch.nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def through_traineval(
    run: str, seed: int, train: TensorDataset, args: argparse.Namespace
) -> torch.nn.Module:
    epochs, beta = args.epochs, args.beta
    torch.manual_seed(seed)
    vae = run == "traineval VAE"
    shape = {"hidden_sizes": tuple(args.hidden), "latent_dim": 8}
    model = VAE(64, **shape) if vae else Autoencoder(64, **shape, output_activation=args.output)
    loader = DataLoader(train, BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    plain = run == "traineval AE"
    settings = (
        {"optimizer_type": "adam", "weight_decay": 0.0, "scheduler_type": "constant"}
        if plain
        else {}
    )
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(
            num_epochs=epochs,
            learning_rate=args.lr,
            warmup_steps=0 if plain else 100,
            gradient_clipping=not plain,
            early_stopping_patience=0,
            seed=seed,
            output_dir=folder,
            tensorboard_logging=False,
            progress_bar=False,
            save_best_model=False,
            log_frequency=100_000,
            **settings,
        )
        mode = Unsupervised(objective="elbo", beta=beta) if vae else Unsupervised()
        TrainingManager(config).train(model, loader, mode=mode)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64], help="encoder widths")
    parser.add_argument(
        "--output", default=None, help="the autoencoders' output activation (e.g. sigmoid)"
    )
    parser.add_argument(
        "--runs", default="hand-written AE,traineval AE,traineval AE defaults,traineval VAE"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    runs = args.runs.split(",")
    results: dict[str, list[tuple[float, float]]] = {run: [] for run in runs}
    for seed in (int(s) for s in args.seeds.split(",")):
        train, test = split(seed)
        for run in runs:
            if run == "hand-written AE":
                model = hand_written(seed, train, args)
            else:
                model = through_traineval(run, seed, train, args)
            results[run].append(scores(model, train, test))
            mse, probe = results[run][-1]
            print(f"seed {seed} {run:24s} test MSE {mse:.5f}  probe {probe:.4f}", flush=True)
    shape = (
        f"hidden {args.hidden}, learning rate {args.lr}, VAE beta {args.beta}, output {args.output}"
    )
    print(f"\n{args.epochs} epochs, batch {BATCH}, {shape}\n")
    print("| run | test MSE | linear probe | per seed (MSE / probe) |")
    print("|---|---|---|---|")
    for run, values in results.items():
        mses, probes = [v[0] for v in values], [v[1] for v in values]
        per_seed = ", ".join(f"{m:.4f} / {p:.3f}" for m, p in values)
        print(
            f"| {run} | {statistics.mean(mses):.4f} | {statistics.mean(probes):.4f} | {per_seed} |"
        )


if __name__ == "__main__":
    main()
