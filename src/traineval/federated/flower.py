"""Federated training across machines on Flower: traineval's client training, Flower's transport.

`mode='federated'` simulates clients in one process. To train across machines, Flower
(https://flower.ai, `pip install 'traineval[flower]'`) carries the messages and runs the server
strategy; traineval supplies what runs on each side:

- `client_app(model_fn, data_fn, config)`: a Flower `ClientApp` whose `train` handler runs
  the same local training as the simulation (the federated `local_epochs` with the configured
  optimizer, clipping, precision; `modes.federated.train_client`) and whose `evaluate`
  handler runs traineval's `Evaluator` on the node's validation data.
- `server_app(model_fn, config)`: a Flower `ServerApp` running Flower's FedAvg (FedAvgM when
  the federated `server_lr` / `server_momentum` say so) for `num_epochs` rounds from
  the model `model_fn` builds under `config.seed`; it writes `metrics.jsonl` (one record per
  round and source), a checkpoint after every round (`checkpoints/last.pt`) and the final
  weights (`final_model.safetensors`) to `output_dir`. `resume_from="auto"` (or the run
  config's `traineval-resume = "auto"`) continues a stopped run from its checkpoint, to the
  weights an uninterrupted run reaches.
- `LocalGrid` / `run_local(server, client, node_configs)`: a Flower `Grid` that delivers
  messages to ClientApps in this process, for trying an app (and testing it) without a
  SuperLink.

Deploy with Flower's own tools (`flower-superlink`, `flower-supernode`, `flwr run`); the app
module names the two apps, e.g. `clientapp = client_app(...)` and `serverapp = server_app(...)`.
For config files there is a ready-made app, `traineval.federated.flower_app` (`traineval flower`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
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
        f"traineval.federated.flower needs Flower: pip install 'traineval[flower]' ({error})"
    ) from None

from ..assembly.evaluator import Evaluator
from ..config.training_config import TaskType, TrainingConfig
from ..loggers.jsonl import plain
from ..modes.federated import ClientRound, Federated, client_seed, train_client
from ..modes.supervised import SupervisedStep
from ..runs.checkpoint import (
    CHECKPOINT_FORMAT,
    flower_run_ended,
    load_checkpoint_file,
    save_checkpoint_file,
    save_safetensors,
)
from ..runs.resume import check_compatible, check_mode
from ..runs.rundir import holds_cross_validation
from ..system.files import atomic_write_json, atomic_write_text, read_json_or_none
from ..system.seeding import capture_rng, restore_rng, seed_everything
from ..system.version import __version__
from ..tasks import AutoLoss
from ..training.batches import batch_size_of, split_batch
from ..training.exit_codes import first_line
from ..training.optim import configured_scheduler
from ..training.precision import available_device, resolve_precision
from ..training.run_checkpoints import Contents, checkpoint_payload
from ..training.stopping import signal_name_of
from .flower_controls import CLIENT_KEY, STEPS_KEY, ServerControls, correction_of, strip

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
CHECKPOINT = Path("checkpoints") / "last.pt"
LEGACY_FORMAT = "traineval-flower-checkpoint"  # this server's, in earlier versions
RESUME_KEY = "traineval-resume"  # run config: "auto" or a checkpoint path
NODE_WAIT_SECONDS = 30.0  # a deployment's SuperNodes connect over time: wait before warning
logger = logging.getLogger(__name__)
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
        federated: Federated | None = None,
    ) -> None:
        _check_callable("model_fn", model_fn)
        _check_callable("data_fn", data_fn)
        self.model_fn, self.data_fn, self.config = model_fn, data_fn, config
        self.federated = Federated.of(federated, config)
        self.loss_function, self.task_type = loss_function, task_type
        chosen = config.device if config.device != "auto" else _auto_device()
        self.device = available_device(chosen)  # the CPU where the GPU asked for is absent
        self.precision = resolve_precision(config.precision, self.device)
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
        identity = int(context.node_config.get("partition-id", context.node_id))
        seed = client_seed(config.seed, int(settings.get("server-round", 0)), identity)
        # The client's randomness (shuffle, dropout) follows the run seed, the round and the
        # client (its partition-id, else the node) only: not which clients this process
        # trained before, in what order; the simulation seeds its clients the same way.
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        correction = correction_of(message, names)  # SCAFFOLD's c - c_i, else None
        job = ClientRound(
            lr,
            seed,
            self.federated.local_epochs,
            self.federated.proximal_mu,
            None if correction is None else [t.to(self.device) for t in correction],
        )
        loss_sum, samples = train_client(
            model, train_loader, self.step, config, self.precision, job
        )
        values: dict[str, Any] = {"train_loss": float(loss_sum) / samples, "num-examples": samples}
        if correction is not None:  # what the server needs to update this client's control
            values[CLIENT_KEY] = identity
            values[STEPS_KEY] = self.federated.local_epochs * len(train_loader)
        metrics = MetricRecord(values)
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
    federated: Federated | None = None,
) -> ClientApp:
    """A Flower `ClientApp` that trains and evaluates with traineval.

    `data_fn(context)` returns the node's `(train_loader, val_loader)`: read which share of
    the data is this node's from `context.node_config` (e.g. `partition-id`); the val loader
    may be None when the server does not ask clients to evaluate. The client learning rate is
    the server's `lr` config value when it sends one, else `config.learning_rate`.
    `federated` holds the federated settings (`local_epochs`); by default the config's
    `mode_settings`.
    """
    client = FlowerClient(
        model_fn,
        data_fn,
        config,
        loss_function=loss_function,
        task_type=task_type,
        federated=federated,
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
        resume_from: str | Path | None = None,
        federated: Federated | None = None,
    ) -> None:
        _check_callable("model_fn", model_fn)
        self.federated = Federated.of(federated, config)
        if config.scheduler_type == "plateau":
            raise ValueError(
                "scheduler_type='plateau' is not supported with Flower (no server-side metric "
                "drives it); choose 'cosine', 'step', 'onecycle' or 'constant'"
            )
        _refuse_stops(config)
        if config.ema_decay:
            raise ValueError(
                f"ema_decay={config.ema_decay} is not supported with Flower yet (the server "
                "keeps no average of the global weights); set ema_decay=0"
            )
        if config.label_smoothing or config.class_weights is not None:
            raise ValueError(
                "label_smoothing / class_weights are not supported with Flower yet (its "
                "clients train with the plain default loss); pass your own loss_function to "
                "client_app instead"
            )
        self.model_fn, self.config, self.strategy = model_fn, config, strategy
        self.evaluate_on_clients, self.server_evaluate = evaluate_on_clients, server_evaluate
        self.on_finish, self.resume_from = on_finish, resume_from
        self.output = Path(config.output_dir or "runs/flower")
        self.rounds = planned_rounds(config)
        self.client_lrs = client_learning_rates(config, self.rounds)
        self.controls: ServerControls | None = None  # SCAFFOLD's, set when a run starts

    def main(self, grid: Grid, context: Context) -> None:
        config = self.config
        # Initial weights, and Flower's choice of nodes per round (Python's `random`), follow
        # the run's seed, as TrainingManager seeds a run.
        seed_everything(config.seed)
        model = self.model_fn()
        chosen = (
            self.strategy
            if self.strategy is not None
            else default_strategy(config, self.evaluate_on_clients, self.federated)
        )
        resume_from = self.resume_from
        saved = self._begin(resume_from if resume_from is not None else _resume_setting(context))
        done = 0 if saved is None else int(saved["round"])
        records: list[dict[str, Any]] = [] if saved is None else list(saved["records"])
        self.controls = self._controls(model)
        if saved is not None and not self._restore(saved, model, chosen):
            return
        self._check_nodes(grid)
        run = RunStrategy(chosen, self.client_lrs, done, records, self.controls)
        result = run.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=self.rounds - done,
            train_config=ConfigRecord({"lr": config.learning_rate}),
            evaluate_fn=self._end_of_round(model, chosen, done, records, saved is not None),
        )
        model.load_state_dict(result.arrays.to_torch_state_dict())
        self._finish(model)

    def _controls(self, model: nn.Module) -> ServerControls | None:
        """SCAFFOLD's control variates, kept by the server (None without control_variates)."""
        if not self.federated.control_variates:
            return None
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        return ServerControls(names, self.federated.clients)

    def _restore(self, saved: dict[str, Any], model: nn.Module, chosen: Strategy) -> bool:
        """Put a resumed run's weights, random stream and strategy state back; False when
        the run had already finished (its final model is saved now if it was missing)."""
        done, output = int(saved["round"]), self.output
        model.load_state_dict(saved["model"] if "model" in saved else saved["arrays"])
        if done >= self.rounds:
            # (without `on_finish`, e.g. a server of your own, no test is written)
            if flower_run_ended(output) if self.on_finish else (output / FINAL_MODEL).exists():
                logger.warning(
                    "%s: the run finished its %d rounds; nothing to resume", output, done
                )
            else:  # stopped after its last round, before the final model or its test
                self._finish(model)
            return False
        restore_rng(saved["rng"], None)  # Flower's node sampling continues its sequence
        _load_strategy_state(chosen, saved["strategy"], custom=self.strategy is not None)
        if self.controls is not None and saved.get("controls"):
            self.controls.load_state_dict(saved["controls"])
        logger.info("resuming the Flower run in %s after round %d", output, done)
        return True

    def _check_nodes(
        self, grid: Grid, wait_seconds: float = NODE_WAIT_SECONDS, poll_seconds: float = 1.0
    ) -> None:
        """Before the first round, compare the nodes the server will wait for (mode.clients)
        with those there: a local grid with too few is refused; on a deployment, where
        SuperNodes connect over time, a shortfall after `wait_seconds` is named in a warning
        (Flower itself keeps waiting, so starting the missing SuperNodes continues the run)."""
        wanted = self.federated.clients
        if self.strategy is not None:  # your strategy decides how many it waits for
            return
        nodes = len(list(grid.get_node_ids()))
        if isinstance(grid, LocalGrid):
            if nodes < wanted:
                raise ValueError(  # Flower would wait for the missing nodes forever
                    f"mode.clients={wanted}: the server waits for that many nodes before the "
                    f"first round, and this LocalGrid has {nodes}"
                )
            return
        deadline = time.monotonic() + wait_seconds
        while nodes < wanted and time.monotonic() < deadline:
            time.sleep(poll_seconds)
            nodes = len(list(grid.get_node_ids()))
        if nodes < wanted:
            logger.warning(
                "mode.clients=%d: the server waits for %d connected SuperNodes before the "
                "first round and %d %s connected after %.0f s: start %d more, or set "
                "mode.clients=%d in the config (waiting)",
                wanted, wanted, nodes, "is" if nodes == 1 else "are", wait_seconds,
                wanted - nodes, max(nodes, 1),
            )  # fmt: skip

    def _end_of_round(
        self,
        model: nn.Module,
        chosen: Strategy,
        done: int,
        records: list[dict[str, Any]],
        resumed: bool,
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """Flower's last call of a round (and one before the first): evaluate on the server,
        then checkpoint the finished round and rewrite metrics.jsonl."""
        server_evaluate = self.server_evaluate

        def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and resumed:
                return None  # the resumed weights were evaluated before the interruption
            result = None
            if server_evaluate is not None:
                model.load_state_dict(arrays.to_torch_state_dict())
                result = MetricRecord({k: float(v) for k, v in server_evaluate(model).items()})
                _record(records, "server_evaluation", done + server_round, result)
            if server_round > 0:
                self._checkpoint(done + server_round, arrays, chosen, records)
            return result

        return end_of_round

    def _finish(self, model: nn.Module) -> None:
        save_safetensors(model, self.output / FINAL_MODEL)
        if self.on_finish is not None:
            self.on_finish(model)

    def _begin(self, resume_from: str | Path | None) -> dict[str, Any] | None:
        """The checkpoint to continue from (None: a fresh run, the output dir claimed)."""
        output, config = self.output, self.config
        if resume_from is None or (
            str(resume_from) == "auto" and not (output / CHECKPOINT).exists()
        ):
            if resume_from is not None:
                logger.info("no Flower checkpoint to resume from in %s; starting fresh", output)
            _claim(output, config.overwrite_output_dir)
            (output / CHECKPOINT).unlink(missing_ok=True)  # an overwritten run's: never resumed
            output.mkdir(parents=True, exist_ok=True)
            return None
        path = output / CHECKPOINT if str(resume_from) == "auto" else Path(resume_from)
        saved = load_checkpoint_file(path)
        # this server's checkpoints are the library's, with the rounds' state ("round");
        # those of earlier versions had a format of their own
        ours = saved.get("format") == CHECKPOINT_FORMAT and "round" in saved
        if not ours and saved.get("format") != LEGACY_FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a traineval Flower checkpoint (it was not written by "
                "traineval.federated.flower's server)"
            )
        check_compatible(saved["config"], config.to_dict(), 1, 1)
        check_mode(saved, self.federated)
        return saved

    def _checkpoint(
        self, done: int, arrays: ArrayRecord, strategy: Strategy, records: list[dict[str, Any]]
    ) -> None:
        """After round `done`: everything the next round needs, and the rounds' metrics, as
        a traineval checkpoint (the global weights under "model"; one round = one step)."""
        weights = arrays.to_torch_state_dict()
        payload = checkpoint_payload(
            "last",
            self.config,
            Contents(done, done, weights, optimizer={}),  # the server's state: the strategy's
            {
                "round": done,
                "rounds": self.rounds,
                "strategy": _strategy_state(strategy),
                "rng": capture_rng(),
                "records": records,
                "mode": self.federated.to_dict(),
                "controls": None if self.controls is None else self.controls.state_dict(),
                "traineval_version": __version__,
            },
        )
        save_checkpoint_file(payload, self.output / CHECKPOINT)
        write_rounds(records, self.output / "metrics.jsonl")


def server_app(
    model_fn: ModelFn,
    config: TrainingConfig,
    *,
    evaluate_on_clients: bool = True,
    server_evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    strategy: Strategy | None = None,
    on_finish: Callable[[nn.Module], None] | None = None,
    resume_from: str | Path | None = None,
    federated: Federated | None = None,
) -> ServerApp:
    """A Flower `ServerApp`: FedAvg(M) over the connected nodes for `config.num_epochs` rounds.

    `federated` holds the federated settings (by default the config's `mode_settings`).
    Each round samples `client_fraction` of the nodes (at least one; it waits for
    `clients` nodes before the first round). Clients train with the configured
    schedule's learning rate for the round (one round = one update, as in the simulation).
    `server_evaluate(model)` returns metrics of the global model on the server's own data,
    after every round; `on_finish(model)` gets the final global model (e.g. to test it). Pass
    your own Flower `strategy` to replace FedAvg(M); the rest stays.

    After every round the server saves `output_dir/checkpoints/last.pt` (global weights,
    FedAvgM's momentum, the random state that picks the nodes, the rounds' metrics).
    `resume_from="auto"` continues from it (starting fresh when there is none; a path names
    another checkpoint), as does the run config value `traineval-resume = "auto"`: the
    resumed run reaches the weights of an uninterrupted one. Without it, an output_dir that
    holds an earlier run's results is refused unless `overwrite_output_dir`.
    """
    server = FlowerServer(
        model_fn,
        config,
        evaluate_on_clients=evaluate_on_clients,
        server_evaluate=server_evaluate,
        strategy=strategy,
        on_finish=on_finish,
        resume_from=resume_from,
        federated=federated,
    )
    app = ServerApp()
    app.main()(server.main)
    return app


def planned_rounds(config: TrainingConfig) -> int:
    """The rounds a Flower run trains: `num_epochs`, or `max_steps` of them."""
    return min(config.num_epochs, config.max_steps or config.num_epochs)


def _refuse_stops(config: TrainingConfig) -> None:
    """The stops a Flower server does not make (it runs its rounds, `num_epochs`, or
    `max_steps` of them): `max_time` and `stop_when` are refused, naming them (accepted,
    they did nothing); an `early_stopping_patience` you set, which a shared config often
    carries, is said in a warning."""
    given = [
        f"{name}={getattr(config, name)!r}"
        for name, unset in (("max_time", None), ("stop_when", ()))
        if getattr(config, name) != unset
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} is not supported with Flower yet (the server runs every "
            "round: training.num_epochs, or max_steps of them); remove it"
        )
    patience = config.early_stopping_patience
    if "early_stopping_patience" in config.given_fields and patience:
        logger.warning(
            "early_stopping_patience=%d does nothing with Flower: the server runs every round "
            "(training.num_epochs, or max_steps of them)",
            patience,
        )


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


def default_strategy(
    config: TrainingConfig, evaluate_on_clients: bool = True, federated: Federated | None = None
) -> Strategy:
    """Flower's FedAvg with the federated settings' client sampling; FedAvgM when the
    server's learning rate or momentum differ from plain averaging (the same update as
    `ServerOptimizer`)."""
    f = Federated.of(federated, config)
    # The simulation's count of clients per round (rounded half up); Flower rounds down.
    per_round = f.clients_per_round(f.clients)
    options: dict[str, Any] = {
        "fraction_train": f.client_fraction,
        "fraction_evaluate": 1.0 if evaluate_on_clients else 0.0,
        "min_train_nodes": per_round,
        "min_evaluate_nodes": 1 if evaluate_on_clients else 0,
        "min_available_nodes": f.clients,
    }
    # Flower warns that evaluation will be skipped when fraction_evaluate is 0: here it is
    # what evaluate_on_clients=False asks for
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    if not evaluate_on_clients:
        flower_log.setLevel(logging.ERROR)
    try:
        if f.server_lr != 1.0 or f.server_momentum > 0:
            return FedAvgM(
                server_learning_rate=f.server_lr,
                server_momentum=f.server_momentum,
                **options,
            )
        return FedAvg(**options)
    finally:
        flower_log.setLevel(level)


def saved_round(output_dir: str | Path) -> int | None:
    """The last finished round of the Flower run checkpointed in `output_dir` (None: none)."""
    path = Path(output_dir) / CHECKPOINT
    return int(load_checkpoint_file(path)["round"]) if path.exists() else None


def flower_summary(
    output: Path, rounds: int, seconds: float, error: BaseException | None = None
) -> None:
    """`summary.json` of a Flower run (as `fit` writes one, for wrappers to read its
    `status`): finished, interrupted (a signal) or failed, with the rounds done and the
    final model's test metrics. A start that failed before any round of its own leaves a
    finished run's summary as it was."""
    try:
        done = saved_round(output) or 0
    except Exception:  # a damaged checkpoint: the error that ended the run says more
        done = 0
    status = "finished"
    if error is not None:
        stopped = isinstance(error, KeyboardInterrupt)
        status = "interrupted" if stopped else "failed"
        earlier = read_json_or_none(output / "summary.json")
        if (
            isinstance(earlier, dict)
            and earlier.get("status") == "finished"
            and earlier.get("rounds_done") == done
        ):
            return  # a finished run a failed restart did not change: its summary stays
    tested = read_json_or_none(output / "evaluation" / "metrics.json")
    summary = {
        "status": status,
        "stop_reason": None if error is None else _stop_reason(error),
        "mode": "federated (flower)",
        "rounds_done": done,
        "rounds": rounds,
        "seconds": seconds,
        "output_dir": str(output),
        "final_model": str(output / FINAL_MODEL) if status == "finished" else None,
        "test_metrics": (tested or {}).get("test") if status == "finished" else None,
    }
    if not output.is_dir():
        return
    try:
        atomic_write_json(output / "summary.json", summary)
    except OSError as failed:  # (a full disk): the run's own error is the one to say
        logger.warning("could not write the Flower run's summary.json: %s", failed)


def _stop_reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted by {signal_name_of(error)}"
    return f"{type(error).__name__}: {first_line(error)}"


def write_rounds(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """`metrics.jsonl` from the rounds' records (see `_record`), rewritten whole and
    atomically after every round."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


_PREFIXES = {"train": "train_", "validation": "val_", "server_evaluation": "server_"}


def _record(records: list[dict[str, Any]], event: str, server_round: int, metrics: Any) -> None:
    """Append a round's metrics from one source: the clients' training, their evaluation,
    the server's evaluation (round 0: before training)."""
    if metrics is None:
        return
    prefix = _PREFIXES[event]  # the clients' train_loss stays train_loss
    values = {k if k.startswith(prefix) else f"{prefix}{k}": v for k, v in dict(metrics).items()}
    records.append(plain({"event": event, "step": server_round, "round": server_round, **values}))


class RunStrategy(Strategy):
    """A strategy (the user's, or FedAvg(M)) under a traineval run: every method delegates
    to it, with the run's round number (a resumed run continues its count, which the
    clients' seeds follow), the schedule's client learning rate in each round's train
    config, and the aggregated metrics recorded for metrics.jsonl. Flower's `start` drives
    the rounds; the wrapped strategy is not modified."""

    def __init__(
        self,
        inner: Strategy,
        client_lrs: Sequence[float],
        done: int,
        records: list[dict[str, Any]],
        controls: ServerControls | None = None,
    ) -> None:
        self.inner, self.client_lrs, self.done, self.records = inner, client_lrs, done, records
        self.controls = controls  # SCAFFOLD's, when the run has control variates

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        lr = config["lr"] = self.client_lrs[self.done + server_round - 1]
        messages = self.inner.configure_train(self.done + server_round, arrays, config, grid)
        if self.controls is None:
            return messages
        return self.controls.configure(messages, arrays, float(lr))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        if self.controls is not None:
            replies = list(replies)
            self.controls.update(replies)
        arrays, metrics = self.inner.aggregate_train(self.done + server_round, replies)
        metrics = strip(metrics)
        _record(self.records, "train", self.done + server_round, metrics)
        if metrics is not None:
            self.records[-1]["learning_rate"] = self.client_lrs[self.done + server_round - 1]
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(self.done + server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        metrics = self.inner.aggregate_evaluate(self.done + server_round, replies)
        _record(self.records, "validation", self.done + server_round, metrics)
        return metrics


def _strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's state across rounds besides the global weights: FedAvgM's server
    momentum, and a custom strategy's own `state_dict()` when it has one."""
    momentum = getattr(strategy, "momentum_vector", None)
    state: dict[str, Any] = {
        "momentum": None if momentum is None else [torch.from_numpy(a) for a in momentum]
    }
    own = getattr(strategy, "state_dict", None)
    if callable(own):
        state["custom"] = own()
    return state


def _load_strategy_state(strategy: Strategy, state: dict[str, Any], custom: bool) -> None:
    if isinstance(strategy, FedAvgM) and state["momentum"] is not None:
        strategy.momentum_vector = [t.numpy() for t in state["momentum"]]
    load = getattr(strategy, "load_state_dict", None)
    if "custom" in state and callable(load):
        load(state["custom"])
    elif custom and type(strategy) not in (FedAvg, FedAvgM):
        logger.warning(
            "resuming with a custom Flower strategy (%s) without state_dict / load_state_dict: "
            "the global weights, the node sampling and FedAvgM momentum are restored, any "
            "other state the strategy keeps starts anew",
            type(strategy).__name__,
        )


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


def _resume_setting(context: Context) -> str | None:
    """The run config's `traineval-resume`: "auto", a checkpoint path, true or false."""
    value = context.run_config.get(RESUME_KEY)
    if value is None or value is False or value == "":
        return None
    if value is True:
        return "auto"
    if isinstance(value, str):
        return value
    raise ValueError(
        f'run config {RESUME_KEY}={value!r} is invalid: expected "auto", a checkpoint path, '
        "true or false"
    )


def _claim(output: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless `overwrite_output_dir` says so,
    and into a cross-validation's folder at all (its folds would read as this run's)."""
    if holds_cross_validation(output):
        raise ValueError(
            f"output_dir={str(output)!r} holds a cross-validation: a Flower run goes in "
            "another output_dir"
        )
    earlier = [output / name for name in ("metrics.jsonl", FINAL_MODEL, CHECKPOINT)]
    if not overwrite and any(path.exists() for path in earlier):
        raise ValueError(
            f"output_dir={str(output)!r} already holds an earlier Flower run's results; "
            "continue it with resume_from='auto' (CLI: --resume auto), choose another output_dir "
            "or set "
            "overwrite_output_dir=True"
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
