"""The Flower app: `serverapp` and `clientapp` built by traineval.federated.flower.

Each SuperNode trains on its Dirichlet share of digits' first 1,400 rows (node config
`partition-id`, `num-partitions`); the server tests the global model on the other 397 rows
after every round and writes `runs/flower-digits/` (metrics.jsonl, final_model.safetensors).
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from traineval import TrainingConfig
from traineval.federated.flower import client_app, server_app
from traineval.modes import Federated
from traineval.modes.federated import partition

TRAIN_ROWS = 1400


def digits() -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y))


def model_fn() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def data_fn(context) -> tuple[DataLoader, None]:
    """This node's share of the training rows; no client-side validation."""
    train = Subset(digits(), range(TRAIN_ROWS))
    parts = int(context.node_config["num-partitions"])
    shares = partition(train, parts, scheme="dirichlet", alpha=0.5, seed=0)
    share = Subset(train, shares[int(context.node_config["partition-id"])])
    return DataLoader(share, batch_size=32, shuffle=True), None


def test_accuracy(model: nn.Module) -> dict[str, float]:
    x, y = digits().tensors
    with torch.no_grad():
        predicted = model(x[TRAIN_ROWS:]).argmax(1)
    return {"accuracy": float((predicted == y[TRAIN_ROWS:]).float().mean())}


config = TrainingConfig(
    num_epochs=int(os.environ.get("FLOWER_DIGITS_ROUNDS", "10")),  # rounds
    learning_rate=0.05,
    optimizer_type="sgd",
    scheduler_type="constant",
    warmup_steps=0,
    output_dir=os.environ.get("FLOWER_DIGITS_OUTPUT", "runs/flower-digits"),
    overwrite_output_dir=True,
    device="cpu",
)
federated = Federated(clients=int(os.environ.get("FLOWER_DIGITS_NODES", "2")), local_epochs=2)
clientapp = client_app(model_fn, data_fn, config, federated=federated)
serverapp = server_app(
    model_fn,
    config,
    evaluate_on_clients=False,
    server_evaluate=test_accuracy,
    federated=federated,
)
