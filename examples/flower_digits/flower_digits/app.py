"""The Flower app: `serverapp` and `clientapp` built by traineval.federated.flower.

Each SuperNode trains on its Dirichlet share of digits' first 1,400 rows (node config
`partition-id`, `num-partitions`); the server tests the global model on the other 397 rows
after every round and writes `output-dir` (metrics.jsonl, final_model.safetensors).

Its settings are Flower's run config (`[tool.flwr.app.config]` in pyproject.toml, changed
per run with `flwr run . <connection> --run-config "rounds=3 nodes=2"`): `rounds`, `nodes`
(the SuperNodes the server waits for) and `output-dir` (a relative one is read from the
SuperLink's working directory, where Flower starts the ServerApp).
"""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from traineval import TrainingConfig
from traineval.federated.flower import FlowerServer, client_app
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


def settings(rounds: int = 10, output_dir: str = "runs/flower-digits") -> TrainingConfig:
    return TrainingConfig(
        num_epochs=rounds,  # rounds
        learning_rate=0.05,
        optimizer_type="sgd",
        scheduler_type="constant",
        warmup_steps=0,
        output_dir=output_dir,
        overwrite_output_dir=True,
        device="cpu",
    )


# The clients' settings do not depend on the run config (a constant learning rate).
clientapp = client_app(model_fn, data_fn, settings(), federated=Federated(local_epochs=2))
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """The run config's `rounds`, `nodes` and `output-dir`, then traineval's server."""
    run = context.run_config
    server = FlowerServer(
        model_fn,
        settings(int(run["rounds"]), str(run["output-dir"])),
        evaluate_on_clients=False,
        server_evaluate=test_accuracy,
        federated=Federated(clients=int(run["nodes"]), local_epochs=2),
    )
    server.main(grid, context)
