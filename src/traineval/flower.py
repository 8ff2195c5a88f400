"""Federated training across machines on Flower: traineval's client training, Flower's transport.

`mode='federated'` simulates clients in one process. To train across machines, Flower
(https://flower.ai, `pip install 'traineval[flower]'`) carries the messages and runs the server
strategy; traineval supplies what runs on each side:

- `client_app(model_fn, data_fn, config)`: a Flower `ClientApp` whose `train` handler runs
  the same local training as the simulation (`federated_local_epochs` with the configured
  optimizer, clipping, precision; `modes.federated.train_client`) and whose `evaluate`
  handler runs traineval's `Evaluator` on the node's validation data.
- `server_app(model_fn, config)`: a Flower `ServerApp` running Flower's FedAvg (FedAvgM when
  `federated_server_lr` / `federated_server_momentum` say so) for `num_epochs` rounds from
  the model `model_fn` builds under `config.seed`; it writes `metrics.jsonl` (one record per
  round) and the final weights (`final_model.safetensors`) to `output_dir`.
- `LocalGrid` / `run_local(server, client, node_configs)`: a Flower `Grid` that delivers
  messages to ClientApps in this process, for trying an app (and testing it) without a
  SuperLink.

Deploy with Flower's own tools (`flower-superlink`, `flower-supernode`, `flwr run`); the app
module names the two apps, e.g. `clientapp = client_app(...)` and `serverapp = server_app(...)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy
    from flwr.supercore.task_identity import TaskIdentity  # what Flower's runtimes set
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"traineval.flower needs Flower: pip install 'traineval[flower]' ({error})"
    ) from None

from .checkpoint import save_safetensors
from .config import TaskType, TrainingConfig
from .evaluation import Evaluator
from .loggers.jsonl import plain
from .modes.base import batch_size_of, split_batch
from .modes.federated import train_client
from .modes.supervised import SupervisedStep
from .optim import configured_scheduler
from .precision import resolve_precision
from .tasks import AutoLoss

__all__ = ["LocalGrid", "client_app", "default_strategy", "run_local", "server_app"]

FINAL_MODEL = "final_model.safetensors"
ModelFn = Callable[[], nn.Module]
DataFn = Callable[[Any], tuple[Any, Any]]  # Flower Context -> (train loader, val loader | None)


def client_app(
    model_fn: ModelFn,
    data_fn: DataFn,
    config: TrainingConfig,
    *,
    loss_function: Any = None,
    task_type: TaskType | None = None,
) -> Any:
    """A Flower `ClientApp` that trains and evaluates with traineval.

    `data_fn(context)` returns the node's `(train_loader, val_loader)`: read which share of
    the data is this node's from `context.node_config` (e.g. `partition-id`); the val loader
    may be None when the server does not ask clients to evaluate. The client learning rate is
    the server's `lr` config value when it sends one, else `config.learning_rate`.
    """
    _check_callable("model_fn", model_fn)
    _check_callable("data_fn", data_fn)
    device = torch.device(config.device if config.device != "auto" else _auto_device())
    precision = resolve_precision(config.precision, config.mixed_precision, device)
    loss = loss_function if loss_function is not None else AutoLoss()
    step = SupervisedStep(loss)
    app = ClientApp()

    def load(message: Message) -> nn.Module:
        model = model_fn().to(device)
        model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
        return model

    @app.train()
    def train(message: Message, context: Context) -> Message:
        model = load(message)
        train_loader, _ = data_fn(context)
        settings: Mapping[str, Any] = message.content.config_records.get("config", {})
        lr = float(settings.get("lr", config.learning_rate))
        seed = _round_seed(config.seed, int(settings.get("server-round", 0)), context.node_id)
        # The client's randomness (shuffle, dropout) depends on the run seed, the round and
        # the node only: not on which clients this process trained before, in what order.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            loss_sum, samples = train_client(
                model, train_loader, step, config, precision, lr=lr, seed=seed
            )
        metrics = MetricRecord({"train_loss": float(loss_sum) / samples, "num-examples": samples})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        model = load(message)
        _, val_loader = data_fn(context)
        if val_loader is None:
            raise ValueError(
                "the server asked this client to evaluate but data_fn returned no validation "
                "loader; return one, or create server_app(..., evaluate_on_clients=False)"
            )
        metrics = Evaluator().evaluate_model(
            model, val_loader, device, loss_function, task_type=task_type, write_files=False
        )
        values: dict[str, Any] = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        values["num-examples"] = _num_examples(val_loader)
        content = RecordDict({"metrics": MetricRecord(values)})
        return Message(content=content, reply_to=message)

    return app


def server_app(
    model_fn: ModelFn,
    config: TrainingConfig,
    *,
    evaluate_on_clients: bool = True,
    server_evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    strategy: Strategy | None = None,
) -> ServerApp:
    """A Flower `ServerApp`: FedAvg(M) over the connected nodes for `config.num_epochs` rounds.

    Each round samples `federated_client_fraction` of the nodes (at least one; it waits for
    `federated_clients` nodes before the first round). Clients train with the configured
    schedule's learning rate for the round (one round = one update, as in the simulation).
    `server_evaluate(model)` returns
    metrics of the global model on the server's own data, after every round. Pass your own
    Flower `strategy` to replace FedAvg(M); the rest stays.
    """
    _check_callable("model_fn", model_fn)
    if config.scheduler_type == "plateau":
        raise ValueError(
            "scheduler_type='plateau' is not supported with Flower (no server-side metric "
            "drives it); choose 'cosine', 'step', 'onecycle' or 'constant'"
        )
    output = Path(config.output_dir or "runs/flower")
    _claim(output, config.overwrite_output_dir)
    rounds = min(config.num_epochs, config.max_steps or config.num_epochs)
    client_lrs = client_learning_rates(config, rounds)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(config.seed)
        model = model_fn()
        chosen = strategy or default_strategy(config, evaluate_on_clients)
        _claim(output, config.overwrite_output_dir)  # again: the app may be started much later
        configure = chosen.configure_train

        def scheduled(
            server_round: int, arrays: ArrayRecord, settings: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            settings["lr"] = client_lrs[server_round - 1]  # this round's client learning rate
            return configure(server_round, arrays, settings, grid)

        chosen.configure_train = scheduled  # type: ignore[method-assign,assignment]
        output.mkdir(parents=True, exist_ok=True)

        def centrally(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_evaluate is None:
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            return MetricRecord({k: float(v) for k, v in server_evaluate(model).items()})

        result = chosen.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": config.learning_rate}),
            evaluate_fn=centrally if server_evaluate is not None else None,
        )
        model.load_state_dict(result.arrays.to_torch_state_dict())
        save_safetensors(model, output / FINAL_MODEL)
        write_rounds(result, output / "metrics.jsonl")

    return app


def client_learning_rates(config: TrainingConfig, rounds: int) -> list[float]:
    """The clients' learning rate in each round: the configured schedule (with warmup) over
    `rounds` updates, as the in-process simulation's server optimizer applies it."""
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    scheduler = configured_scheduler(holder, config, total_steps=rounds)
    rates = []
    for _ in range(rounds):
        rates.append(float(holder.param_groups[0]["lr"]))
        holder.step()
        scheduler.step()
    return rates


def default_strategy(config: TrainingConfig, evaluate_on_clients: bool = True) -> Strategy:
    """Flower's FedAvg with the config's client sampling; FedAvgM when the server's learning
    rate or momentum differ from plain averaging (the same update as `ServerOptimizer`)."""
    options: dict[str, Any] = {
        "fraction_train": config.federated_client_fraction,
        "fraction_evaluate": 1.0 if evaluate_on_clients else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if evaluate_on_clients else 0,
        "min_available_nodes": config.federated_clients,
    }
    if config.federated_server_lr != 1.0 or config.federated_server_momentum > 0:
        return FedAvgM(
            server_learning_rate=config.federated_server_lr,
            server_momentum=config.federated_server_momentum,
            **options,
        )
    return FedAvg(**options)


def write_rounds(result: Any, path: Path) -> None:
    """`metrics.jsonl`, one record per round and source: the clients' training, their
    evaluation, the server's evaluation (round 0: before training). Written whole, atomically,
    when the run has finished (an earlier run's file is replaced only then)."""
    sources = (
        ("train", "train/", result.train_metrics_clientapp),
        ("validation", "val/", result.evaluate_metrics_clientapp),
        ("server_evaluation", "server/", result.evaluate_metrics_serverapp),
    )
    lines = []
    for event, prefix, rounds in sources:
        for server_round, record in sorted(rounds.items()):
            values = {f"{prefix}{k}": v for k, v in dict(record).items()}
            entry = {"event": event, "step": server_round, "round": server_round, **values}
            lines.append(json.dumps(plain(entry)) + "\n")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, path)


class LocalGrid(Grid):
    """A Flower `Grid` that hands each message to a `ClientApp` in this process.

    One node per entry of `node_configs` (e.g. `{"partition-id": 0}`), ids 2, 3, ...; every
    node runs `app`. Use it to try a server and client app together without a SuperLink, or
    in tests: a strategy's `start(grid=...)` takes it where Flower passes its own Grid.
    """

    def __init__(self, app: ClientApp, node_configs: Sequence[Mapping[str, Any]]) -> None:
        self.app = app
        self._run_id = 1
        self._contexts = {
            node_id: Context(self._run_id, node_id, dict(settings), RecordDict(), {})
            for node_id, settings in enumerate(node_configs, start=SUPERLINK_NODE_ID + 1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run_id = run.run_id

    @property
    def run(self) -> Any:
        raise NotImplementedError("LocalGrid runs without a SuperLink: it has no Run record")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp now; its reply waits for `pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does
            message.metadata.__dict__["_run_id"] = self._run_id
            node_id = message.metadata.dst_node_id
            with _identity(run_id=self._run_id, node_id=node_id):
                reply = self.app(message, self._contexts[node_id])
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(
    server: ServerApp, client: ClientApp, node_configs: Sequence[Mapping[str, Any]]
) -> None:
    """Run `server` with one in-process node per entry of `node_configs`, all running
    `client` (see `LocalGrid`): a Flower app tried end to end without a SuperLink."""
    with _identity(run_id=1, node_id=SUPERLINK_NODE_ID):
        server(LocalGrid(client, node_configs), Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), {}))


@contextlib.contextmanager
def _identity(run_id: int, node_id: int) -> Iterator[None]:
    """Flower's runtimes tell a process which task it runs (messages read the run id from
    it); do what they do for the in-process server and clients, and restore it after."""
    saved = {name: getattr(TaskIdentity, f"_{name}") for name in ("task_id", "run_id", "node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, node_id
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, f"_{name}", value)


def _round_seed(seed: int, server_round: int, node_id: int) -> int:
    """A client's shuffle seed for a round: fixed by the run seed, the round and the node."""
    return (seed * 1_000_003 + server_round * 10_007 + node_id) % 2**62


def _claim(output: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless `overwrite_output_dir` says so."""
    earlier = [output / name for name in ("metrics.jsonl", FINAL_MODEL)]
    if not overwrite and any(path.exists() for path in earlier):
        raise ValueError(
            f"output_dir={str(output)!r} already holds an earlier Flower run's results; "
            "choose another output_dir or set overwrite_output_dir=True"
        )


def _check_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a callable, got {value!r}")


def _num_examples(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(batch_size_of(split_batch(batch)[0]) for batch in loader)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
