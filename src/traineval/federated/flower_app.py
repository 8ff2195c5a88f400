"""A ready-made Flower app for traineval config files: federated training without Python code.

Point a Flower app's components at it and name the config in its run config:

    [tool.flwr.app.components]
    serverapp = "traineval.federated.flower_app:serverapp"
    clientapp = "traineval.federated.flower_app:clientapp"

    [tool.flwr.app.config]
    traineval-config = "/path/to/run.yaml"   # data, model, training, evaluation sections

Every SuperNode sets the node config `partition-id` and `num-partitions` and trains on that
share of the config's train split (the federated mode's `partition`: `iid`, or `dirichlet`
with `dirichlet_alpha`, drawn with `training.seed`, so every node computes the
same split). The server evaluates the global model on the val split after every round
(`server_<metric>` in metrics.jsonl), then saves `final_model.safetensors`, `config.yaml`
and the test split's metrics (`evaluation/metrics.json`) in `training.output_dir`.
`traineval flower CONFIG --nodes N` runs this app with N in-process nodes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn
from torch.utils.data import Subset

from ..assembly.evaluator import Evaluator
from ..commands.experiment import RunConfig, RunParts, run_parts
from ..config.config_file import write_run_config
from ..config.training_config import EvaluationMode
from ..modes.federated import Federated, partition
from ..system.files import atomic_write_json
from .flower import FlowerClient, FlowerServer, _auto_device

__all__ = ["CONFIG_KEY", "clientapp", "serverapp"]

CONFIG_KEY = "traineval-config"
MODES = ("federated", "supervised")


@functools.lru_cache(maxsize=4)
def experiment(path: str) -> RunParts:
    """The data splits, model builder and config of a traineval config file (read once)."""
    config = RunConfig.from_yaml(path)
    if config.mode.name not in MODES:
        raise ValueError(
            f"mode={config.mode.name!r} is invalid for traineval.federated.flower_app: its "
            f"clients train supervised; use mode: federated (or supervised) in {path}"
        )
    return run_parts(config)


def federated_settings(config: RunConfig) -> Federated:
    """The run's federated settings (a supervised config's: the defaults, or its
    training.mode_settings)."""
    given = config.mode if config.mode.name == Federated.name else None
    return Federated.of(given, config.training)


def config_path(context: Context) -> str:
    """The config file the app's run config names."""
    path = context.run_config.get(CONFIG_KEY)
    if not path:
        raise ValueError(
            f"traineval.federated.flower_app needs "
            f'`{CONFIG_KEY} = "<path to a traineval YAML config>"` '
            "in the Flower app's [tool.flwr.app.config] (or flwr run --run-config)"
        )
    return str(path)


@functools.lru_cache(maxsize=16)
def _shares(path: str, nodes: int) -> list[list[int]]:
    parts = experiment(path)
    federated = federated_settings(parts.config)
    return partition(
        parts.splits.train,
        nodes,
        scheme=federated.partition,
        alpha=federated.dirichlet_alpha,
        seed=parts.config.training.seed,
        min_samples=federated.min_samples,
    )


def _node_data(context: Context) -> tuple[Any, None]:
    """This node's share of the train split; clients do not evaluate (the server does)."""
    path = config_path(context)
    try:
        nodes = int(context.node_config["num-partitions"])
        share = int(context.node_config["partition-id"])
    except KeyError as missing:
        raise ValueError(
            f"node config {missing} is missing: start each SuperNode with --node-config "
            "'partition-id=<i> num-partitions=<n>'"
        ) from None
    if not 0 <= share < nodes:
        raise ValueError(f"node config partition-id={share} is invalid: expected 0..{nodes - 1}")
    parts = experiment(path)
    subset = Subset(parts.splits.train, _shares(path, nodes)[share])
    return parts.loader(subset, shuffle=True), None


@functools.lru_cache(maxsize=4)
def _client(path: str) -> FlowerClient:
    parts = experiment(path)
    return FlowerClient(
        parts.new_model,
        _node_data,
        parts.config.training,
        task_type=parts.task_type,
        federated=federated_settings(parts.config),
    )


def _server(path: str) -> FlowerServer:
    parts = experiment(path)
    config = parts.config
    evaluator = Evaluator(config.evaluation)
    device = config.training.device if config.training.device != "auto" else _auto_device()
    val_loader = parts.loader(parts.splits.val)
    test_loader = parts.loader(parts.splits.test)
    output = Path(config.training.output_dir or "runs/flower")

    def on_val(model: nn.Module) -> dict[str, float]:
        assert val_loader is not None
        metrics = evaluator.evaluate_model(
            model.to(device), val_loader, device, task_type=parts.task_type, write_files=False
        )
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def on_finish(model: nn.Module) -> None:
        write_run_config(config.to_dict(), output)
        record: dict[str, Any] = {"evaluated": "final global model", "test": None}
        if test_loader is not None:
            metrics = evaluator.evaluate_model(
                model.to(device),
                test_loader,
                device,
                task_type=parts.task_type,
                output_dir=output,
                split=EvaluationMode.TESTING,
            )
            record["test"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        (output / "evaluation").mkdir(parents=True, exist_ok=True)
        atomic_write_json(output / "evaluation" / "metrics.json", record)

    return FlowerServer(
        parts.new_model,
        config.training,
        evaluate_on_clients=False,
        server_evaluate=on_val if val_loader is not None else None,
        on_finish=on_finish,
        federated=federated_settings(config),
    )


clientapp = ClientApp()
serverapp = ServerApp()


@clientapp.train()
def _train(message: Message, context: Context) -> Message:
    return _client(config_path(context)).train(message, context)


@serverapp.main()
def _main(grid: Grid, context: Context) -> None:
    _server(config_path(context)).main(grid, context)
