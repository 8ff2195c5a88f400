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
For config files there is a ready-made app, `traineval.flower_app` (`traineval flower`).
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
from .seeding import seed_everything
from .tasks import AutoLoss

__all__ = [
    "FlowerClient",
    "FlowerServer",
    "LocalGrid",
    "client_app",
    "default_strategy",
    "run_local",
    "server_app",
]

FINAL_MODEL = "final_model.safetensors"
ModelFn = Callable[[], nn.Module]
DataFn = Callable[[Any], tuple[Any, Any]]  # Flower Context -> (train loader, val loader | None)


class FlowerClient:
    """What a ClientApp's `train` and `evaluate` handlers run (see `client_app`)."""

    def __init__(
        self,
        model_fn: ModelFn,
        data_fn: DataFn,
        config: TrainingConfig,
        *,
        loss_function: Any = None,
        task_type: TaskType | None = None,
    ) -> None:
        _check_callable("model_fn", model_fn)
        _check_callable("data_fn", data_fn)
        self.model_fn, self.data_fn, self.config = model_fn, data_fn, config
        self.loss_function, self.task_type = loss_function, task_type
        self.device = torch.device(config.device if config.device != "auto" else _auto_device())
        self.precision = resolve_precision(config.precision, config.mixed_precision, self.device)
        self.step = SupervisedStep(loss_function if loss_function is not None else AutoLoss())

    def load(self, message: Message) -> nn.Module:
        """A fresh model holding the weights the server sent."""
        model = self.model_fn().to(self.device)
        model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
        return model

    def train(self, message: Message, context: Context) -> Message:
        config = self.config
        model = self.load(message)
        train_loader, _ = self.data_fn(context)
        settings: Mapping[str, Any] = message.content.config_records.get("config", {})
        lr = float(settings.get("lr", config.learning_rate))
        seed = _round_seed(config.seed, int(settings.get("server-round", 0)), context.node_id)
        # The client's randomness (shuffle, dropout) follows the run seed, the round and the
        # node only: not which clients this process trained before, in what order.
        loss_sum, samples = train_client(
            model, train_loader, self.step, config, self.precision, lr=lr, seed=seed
        )
        metrics = MetricRecord({"train_loss": float(loss_sum) / samples, "num-examples": samples})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=message)

    def evaluate(self, message: Message, context: Context) -> Message:
        model = self.load(message)
        _, val_loader = self.data_fn(context)
        if val_loader is None:
            raise ValueError(
                "the server asked this client to evaluate but data_fn returned no validation "
                "loader; return one, or create server_app(..., evaluate_on_clients=False)"
            )
        metrics = Evaluator().evaluate_model(
            model,
            val_loader,
            self.device,
            self.loss_function,
            task_type=self.task_type,
            write_files=False,
        )
        values: dict[str, Any] = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        values["num-examples"] = _num_examples(val_loader)
        content = RecordDict({"metrics": MetricRecord(values)})
        return Message(content=content, reply_to=message)


def client_app(
    model_fn: ModelFn,
    data_fn: DataFn,
    config: TrainingConfig,
    *,
    loss_function: Any = None,
    task_type: TaskType | None = None,
) -> ClientApp:
    """A Flower `ClientApp` that trains and evaluates with traineval.

    `data_fn(context)` returns the node's `(train_loader, val_loader)`: read which share of
    the data is this node's from `context.node_config` (e.g. `partition-id`); the val loader
    may be None when the server does not ask clients to evaluate. The client learning rate is
    the server's `lr` config value when it sends one, else `config.learning_rate`.
    """
    client = FlowerClient(
        model_fn, data_fn, config, loss_function=loss_function, task_type=task_type
    )
    app = ClientApp()
    app.train()(client.train)
    app.evaluate()(client.evaluate)
    return app


class FlowerServer:
    """What a ServerApp's `main` runs (see `server_app`)."""

    def __init__(
        self,
        model_fn: ModelFn,
        config: TrainingConfig,
        *,
        evaluate_on_clients: bool = True,
        server_evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
        strategy: Strategy | None = None,
        on_finish: Callable[[nn.Module], None] | None = None,
    ) -> None:
        _check_callable("model_fn", model_fn)
        if config.scheduler_type == "plateau":
            raise ValueError(
                "scheduler_type='plateau' is not supported with Flower (no server-side metric "
                "drives it); choose 'cosine', 'step', 'onecycle' or 'constant'"
            )
        self.model_fn, self.config, self.strategy = model_fn, config, strategy
        self.evaluate_on_clients, self.server_evaluate = evaluate_on_clients, server_evaluate
        self.on_finish = on_finish
        self.output = Path(config.output_dir or "runs/flower")
        _claim(self.output, config.overwrite_output_dir)
        self.rounds = min(config.num_epochs, config.max_steps or config.num_epochs)
        self.client_lrs = client_learning_rates(config, self.rounds)

    def main(self, grid: Grid, context: Context) -> None:
        config, output, server_evaluate = self.config, self.output, self.server_evaluate
        # Initial weights, and Flower's choice of nodes per round (Python's `random`), follow
        # the run's seed, as TrainingManager seeds a run.
        seed_everything(config.seed)
        model = self.model_fn()
        chosen = self.strategy or default_strategy(config, self.evaluate_on_clients)
        _claim(output, config.overwrite_output_dir)  # again: the app may be started much later
        nodes = len(list(grid.get_node_ids()))
        local = isinstance(grid, LocalGrid) and self.strategy is None
        if local and nodes < config.federated_clients:
            raise ValueError(  # Flower would wait for the missing nodes forever
                f"federated_clients={config.federated_clients}: the server waits for that many "
                f"nodes before the first round, and this LocalGrid has {nodes}"
            )
        configure = chosen.configure_train

        def scheduled(
            server_round: int, arrays: ArrayRecord, settings: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            settings["lr"] = self.client_lrs[server_round - 1]  # this round's client rate
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
            num_rounds=self.rounds,
            train_config=ConfigRecord({"lr": config.learning_rate}),
            evaluate_fn=centrally if server_evaluate is not None else None,
        )
        model.load_state_dict(result.arrays.to_torch_state_dict())
        save_safetensors(model, output / FINAL_MODEL)
        write_rounds(result, output / "metrics.jsonl")
        if self.on_finish is not None:
            self.on_finish(model)


def server_app(
    model_fn: ModelFn,
    config: TrainingConfig,
    *,
    evaluate_on_clients: bool = True,
    server_evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    strategy: Strategy | None = None,
    on_finish: Callable[[nn.Module], None] | None = None,
) -> ServerApp:
    """A Flower `ServerApp`: FedAvg(M) over the connected nodes for `config.num_epochs` rounds.

    Each round samples `federated_client_fraction` of the nodes (at least one; it waits for
    `federated_clients` nodes before the first round). Clients train with the configured
    schedule's learning rate for the round (one round = one update, as in the simulation).
    `server_evaluate(model)` returns metrics of the global model on the server's own data,
    after every round; `on_finish(model)` gets the final global model (e.g. to test it). Pass
    your own Flower `strategy` to replace FedAvg(M); the rest stays.
    """
    server = FlowerServer(
        model_fn,
        config,
        evaluate_on_clients=evaluate_on_clients,
        server_evaluate=server_evaluate,
        strategy=strategy,
        on_finish=on_finish,
    )
    app = ServerApp()
    app.main()(server.main)
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
    # The simulation's count of clients per round (rounded half up); Flower rounds down.
    per_round = max(
        1, math.floor(config.federated_client_fraction * config.federated_clients + 0.5)
    )
    options: dict[str, Any] = {
        "fraction_train": config.federated_client_fraction,
        "fraction_evaluate": 1.0 if evaluate_on_clients else 0.0,
        "min_train_nodes": per_round,
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

    def __init__(
        self,
        app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self._run_id = 1
        run = dict(run_config or {})
        self._contexts = {
            node_id: Context(self._run_id, node_id, dict(settings), RecordDict(), dict(run))
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
    server: ServerApp,
    client: ClientApp,
    node_configs: Sequence[Mapping[str, Any]],
    run_config: Mapping[str, Any] | None = None,
) -> None:
    """Run `server` with one in-process node per entry of `node_configs`, all running
    `client` (see `LocalGrid`): a Flower app tried end to end without a SuperLink.
    `run_config` is what `flwr run` passes as the app's run config."""
    settings = dict(run_config or {})
    grid = LocalGrid(client, node_configs, settings)
    with _identity(run_id=1, node_id=SUPERLINK_NODE_ID):
        server(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), settings))


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
