"""Federated mode: FedAvg over simulated clients, one round per optimizer update of the loop.

Each round samples clients, trains a copy of the global model on each client's data for
`local_epochs` with a fresh client optimizer (the configured one), and averages
the clients' weights by their sample counts (McMahan et al., 2017). The round's result
reaches the global model as an update of a *server* optimizer: the step's loss is built so
that its gradient is the pseudo-gradient `global - average`, and SGD with learning rate
`server_lr` (1: plain FedAvg) and momentum `server_momentum` (FedAvgM)
applies it, as in adaptive federated optimization (Reddi et al., 2021). So the loop runs
federated training as it runs any other: evaluation of the global model, early stopping,
checkpoints, exact resume, loggers and callbacks count rounds as updates.

All randomness of a round (which clients, each client's shuffle order, dropout) is drawn
from the global torch generator, which checkpoints capture: a resumed run repeats the
rounds an uninterrupted one would have trained.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config.checks import Flag, Int, Number, OneOf
from ..config.training_config import setting
from ..data.loaders import worker_settings
from ..data.splits import dataset_labels
from ..runs.checkpoint import tensor_entries
from ..system.devices import inexact
from ..system.distributed import Distributed
from ..training.optim import configured_optimizer
from ..training.precision import Precision
from .base import StepOutput, Updates, loss_with_gradient, move_to_device
from .contract import BuildOptimizer, Context, Mode, ModePlan, register
from .resolve import resolve_mode
from .supervised import SupervisedStep

__all__ = [
    "Federated",
    "FederatedStep",
    "ServerOptimizer",
    "client_loaders",
    "partition",
    "train_client",
]

logger = logging.getLogger(__name__)

PARTITIONS = ("iid", "dirichlet")


@register
@dataclasses.dataclass(frozen=True)
class Federated(Mode):
    """FedAvg / FedAvgM over simulated clients, one round per optimizer update
    (`traineval.modes.federated`).

    `train()` takes one loader (its dataset is split among `clients` by `partition`:
    "iid", or "dirichlet" with `dirichlet_alpha`, every client holding at least
    `min_samples`: draws are repeated from the seed, then topped up, so every seed works) or
    a list of client loaders. Each round
    trains `client_fraction` of the clients for `local_epochs`; the server applies the
    average with `server_lr` and `server_momentum` (FedAvgM when > 0). `proximal_mu` > 0
    adds FedProx's proximal term (Li et al., 2020), `mu / 2 * ||w - w_global||^2`, to each
    client's loss: it holds drifting clients (label-skewed data) near the global weights.
    `control_variates` trains with SCAFFOLD's (Karimireddy et al., 2020): each client's
    gradient is corrected by the server's control minus its own, both estimated from the
    rounds' updates and kept in the server optimizer's state (checkpointed: exact resume).
    It is simulated in one process (or over torchrun ranks); Flower refuses it for now.
    """

    name: ClassVar[str] = "federated"
    supervised_loss: ClassVar[bool] = True
    compile_refusal: ClassVar[str | None] = (
        "each round trains fresh copies of the model on the clients, and compiling every "
        "copy would cost more than it saves"
    )
    accumulation_refusal: ClassVar[str | None] = "clients take one optimizer step per batch"
    shards: ClassVar[bool] = False
    # which clients hold which samples, and how many train per round
    resume_fixed: ClassVar[tuple[str, ...]] = (
        "clients",
        "client_fraction",
        "partition",
        "dirichlet_alpha",
        "min_samples",
    )
    clients: int = setting(4, Int(1))
    partition: str = setting("iid", OneOf(PARTITIONS))
    dirichlet_alpha: float = setting(0.5, Number(0, strict=True))
    min_samples: int = setting(2, Int(1))
    local_epochs: int = setting(1, Int(1))
    # the share of clients trained each round
    client_fraction: float = setting(1.0, Number(0, strict=True, at_most=1.0))
    server_lr: float = setting(1.0, Number(0, strict=True))
    server_momentum: float = setting(0.0, Number(0.0, below=1.0))
    proximal_mu: float = setting(0.0, Number(0.0))
    control_variates: bool = setting(False, Flag())

    @classmethod
    def of(cls, given: Any, config: Any) -> Federated:
        """The federated settings a run trains with: `given` (an instance or the name), or,
        for None, the config's `mode_settings["federated"]` or the defaults; checked against
        the config's optimizer (what the Flower integration needs from the mode).

        Raises:
            TypeError: `given` is another mode.
        """
        mode = resolve_mode(cls.name if given is None else given, config)
        if not isinstance(mode, cls):
            raise TypeError(f"federated must be a traineval.modes.Federated, got {mode!r}")
        mode.check_client_optimizer(config)
        return mode

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        self.check_client_optimizer(ctx.config)

    def check_client_optimizer(self, c: Any) -> None:
        """SCAFFOLD's controls assume plain SGD clients: other settings are refused."""
        if self.control_variates and (c.optimizer_type != "sgd" or c.momentum or c.weight_decay):
            raise ValueError(
                "federated.control_variates=True (SCAFFOLD) estimates the controls from plain "
                "SGD steps of the clients: set optimizer_type='sgd', momentum=0 and "
                f"weight_decay=0 (now {c.optimizer_type!r}, momentum={c.momentum}, "
                f"weight_decay={c.weight_decay})"
            )

    def clients_per_round(self, available: int) -> int:
        """How many of `available` clients train each round (at least one)."""
        return max(1, math.floor(self.client_fraction * available + 0.5))

    def plan(self, ctx: Context) -> ModePlan:
        c = ctx.config
        clients = client_loaders(ctx.train_data, self, c.seed)
        supervised = SupervisedStep(
            ctx.loss_function, output_transform=ctx.output_transform, model_loss=ctx.model_loss
        )
        step = FederatedStep(supervised, clients, c, ctx.precision, ctx.job, self)

        def server(model: nn.Module, default: BuildOptimizer) -> torch.optim.Optimizer:
            step.server = ServerOptimizer(
                [p for p in model.parameters() if p.requires_grad],
                c.learning_rate,  # the clients' rate, which the schedule sets per round
                self.server_lr,
                self.server_momentum,
            )
            return step.server

        # One round per update; under torchrun each rank trains a share of the round's
        # clients and the ranks all-reduce the averaged weights (no DDP wrapper). Clients
        # clip their own gradients, not the server's pseudo-gradient.
        return ModePlan(
            step,
            loader=Updates(1),
            wraps_model=False,
            clips_gradients=False,
            optimizer=server,
            shared_seed=True,
            record={"partition": self.partition_record(ctx.train_data, clients, c.seed)},
        )

    def partition_record(self, train: Any, clients: list[Any], seed: int) -> dict[str, Any]:
        """How the clients' data was made (for `mode.json`): the scheme and, per client,
        its sample count and how many samples of each label it holds (where labels can be
        read)."""
        given = isinstance(train, (list, tuple))
        record: dict[str, Any] = {"scheme": "given" if given else self.partition}
        if not given:
            record.update(seed=seed, min_samples=self.min_samples)
            if self.partition == "dirichlet":
                record["dirichlet_alpha"] = self.dirichlet_alpha
        record["clients"] = [_client_record(loader.dataset) for loader in clients]
        return record


class ServerOptimizer(torch.optim.Optimizer):
    """The server's update: `p -= server_lr * v`, `v = momentum * v + pseudo_gradient`.

    Its param group's `lr` is not the server's: it holds the *clients'* learning rate, so the
    run's scheduler (stepped once per round, checkpointed with the optimizer) schedules what
    clients train with, and `learning_rate` in the logs is the clients' rate.
    """

    def __init__(
        self, params: Any, client_lr: float, server_lr: float = 1.0, momentum: float = 0.0
    ) -> None:
        # `rounds`: the rounds applied so far (saved with the optimizer: the clients' seeds
        # follow the round, on resume too)
        defaults = {"lr": client_lr, "server_lr": server_lr, "momentum": momentum, "rounds": 0}
        super().__init__(params, defaults)

    @property
    def rounds(self) -> int:
        return int(self.param_groups[0].get("rounds", 0))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            group["rounds"] = group.get("rounds", 0) + 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["momentum"] > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = p.grad.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-group["server_lr"])


def partition(
    dataset: Dataset[Any],
    clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int = 1,
) -> list[list[int]]:
    """Split `dataset`'s indices among `clients`: `iid` (shuffled, equal shares) or `dirichlet`.

    `dirichlet` gives each client a label-skewed share: for every class, the proportions that
    go to each client are drawn from Dirichlet(alpha) (small alpha: each client sees few
    classes). Draws are repeated (from the seed's stream) until every client holds at least
    `min_samples`; if 100 draws do not, the last is topped up: each client short of
    `min_samples` takes random samples from the largest client, so every seed works.

    Raises:
        ValueError: fewer than `clients * min_samples` samples.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < clients * min_samples:
        raise ValueError(
            f"federated.clients={clients} with federated.min_samples={min_samples} need "
            f"{clients * min_samples} training samples; there are {n}: use fewer clients"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), clients)]
    labels = dataset_labels(dataset)
    for _ in range(100):
        shares = _dirichlet_draw(labels, clients, alpha, rng)
        if min(map(len, shares)) >= min_samples:
            return [sorted(share) for share in shares]
    moved = _top_up(shares, min_samples, rng)
    logger.info(
        "federated.dirichlet_alpha=%g: 100 draws left a client below min_samples=%d; moved "
        "%d samples from the largest clients to the smallest",
        alpha,
        min_samples,
        moved,
    )
    return [sorted(share) for share in shares]


def _dirichlet_draw(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """One label-skewed split: each class's members cut by Dirichlet(alpha) proportions."""
    shares: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].extend(part.tolist())
    return shares


def _top_up(shares: list[list[int]], min_samples: int, rng: np.random.Generator) -> int:
    """Move random samples from the largest share to each share below `min_samples`
    (in place); returns how many moved."""
    moved = 0
    for short in sorted(range(len(shares)), key=lambda i: len(shares[i])):
        while len(shares[short]) < min_samples:
            largest = max(range(len(shares)), key=lambda i: len(shares[i]))
            taken = shares[largest].pop(int(rng.integers(len(shares[largest]))))
            shares[short].append(taken)
            moved += 1
    return moved


def client_loaders(train: Any, settings: Federated, seed: int) -> list[DataLoader[Any]]:
    """Clients from `train`: a list of loaders as given, or one loader's dataset partitioned.

    A partitioned client's loader keeps the given loader's batch size, `drop_last` and
    worker / collate / pinning settings, and shuffles with a generator the round seeds (see
    `FederatedStep`).
    """
    if isinstance(train, (list, tuple)):
        if not train:
            raise ValueError("mode='federated' got an empty list of client loaders")
        return list(train)
    dataset = getattr(train, "dataset", None)
    if dataset is None:
        raise ValueError(
            "mode='federated' needs a DataLoader over a Dataset (it partitions the dataset) or "
            f"a list of client DataLoaders, got {type(train).__name__}"
        )
    shares = partition(
        dataset,
        settings.clients,
        scheme=settings.partition,
        alpha=settings.dirichlet_alpha,
        seed=seed,
        min_samples=settings.min_samples,
    )
    return [
        DataLoader(
            Subset(dataset, share),
            batch_size=train.batch_size,
            shuffle=True,
            drop_last=train.drop_last,
            generator=torch.Generator(),
            **worker_settings(train),
        )
        for share in shares
    ]


def _client_record(dataset: Any) -> dict[str, Any]:
    """A client's sample count and label counts (labels as strings), where the labels can
    be read without loading the samples: a TensorDataset's targets, a `targets` attribute."""
    indices = None
    if isinstance(dataset, Subset):  # a partitioned client
        dataset, indices = dataset.dataset, np.asarray(dataset.indices, dtype=int)
    tensors = getattr(dataset, "tensors", None)
    source = tensors[1] if tensors is not None and len(tensors) >= 2 else None
    source = getattr(dataset, "targets", source)
    samples = len(dataset) if indices is None else len(indices)
    labels = np.asarray(source) if source is not None else None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iub":  # not classes
        return {"samples": samples}
    labels = labels if indices is None else labels[indices]
    values, counts = np.unique(labels, return_counts=True)
    label_counts = {str(v.item()): int(n) for v, n in zip(values, counts, strict=True)}
    return {"samples": samples, "labels": label_counts}


class FederatedStep:
    """One FedAvg round as a step function: its loss's gradient is `global - client average`.

    Clients train with `loss_function` (as in supervised mode) and the configured optimizer,
    clipping and `precision`, starting each round from fresh optimizer state. The step's loss
    value is the clients' mean training loss over the round, weighted by samples.
    """

    def __init__(
        self,
        supervised: SupervisedStep,
        clients: Sequence[Any],
        config: Any,
        precision: Precision,
        job: Distributed | None = None,
        settings: Federated | None = None,
    ) -> None:
        """`supervised`: how a client trains on a batch (the loss, the output transform,
        a model's own loss); `settings`: the mode's (default `Federated()`)."""
        self.settings = settings or Federated()
        self.clients = list(clients)
        self.config = config
        self.precision = precision
        self.job = job or Distributed()
        self.supervised = supervised
        self._worker: nn.Module | None = None
        self._rounds = 0  # without a server optimizer (it counts the rounds otherwise)
        self.server: ServerOptimizer | None = None  # set by the manager; holds the client lr

    def weight(self, batch: Any) -> int:
        return 1

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        # The round's draws come from the global generator, which checkpoints capture.
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        count = self.settings.clients_per_round(len(self.clients))
        chosen = torch.randperm(len(self.clients), generator=generator)[:count].sort().values
        states = tensor_entries(model.state_dict(keep_vars=True))  # not a module's extra state
        average = {name: torch.zeros_like(v, dtype=_sum_dtype(v)) for name, v in states.items()}
        loss_sum = torch.zeros((), device=_device(model))
        total = torch.zeros((), device=_device(model))
        job = self.job
        server_round = (self.server.rounds if self.server is not None else self._rounds) + 1
        self._rounds = server_round
        controls = self._controls(model) if self.settings.control_variates else None
        for position, client in enumerate(chosen.tolist()):
            # a client's shuffle and dropout follow the run seed, the round and the client
            # (as Flower's clients do: the same clients train the same way in both)
            seed = client_seed(self.config.seed, server_round, client)
            if position % job.world_size != job.rank:
                continue  # under torchrun each rank trains its share of the round's clients
            worker, client_loss, samples = self._train_client(
                model, self.clients[client], seed, controls.correction(client) if controls else None
            )
            if controls is not None:
                controls.record(client, model, worker, self._client_steps(self.clients[client]))
            total += samples
            loss_sum += client_loss
            for name, value in tensor_entries(worker.state_dict()).items():
                average[name].add_(value.detach().to(average[name].dtype), alpha=samples)
        # every rank's weighted sums (one all-reduce; a no-op in one process)
        job.sum_in_place([*average.values(), loss_sum, total], "averaging the round's clients")
        if controls is not None:
            controls.apply(job)
        params: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []
        with torch.no_grad():
            for name, value in states.items():
                mean = average[name] / total
                if isinstance(value, nn.Parameter) and value.requires_grad:
                    params.append(value)
                    deltas.append(value.detach() - mean.to(value.dtype))
                elif not isinstance(value, nn.Parameter):  # buffers (norm statistics)
                    value.copy_(mean if inexact(value) else mean.round())
        # value: the clients' mean loss; gradient: global - average (FedAvg's pseudo-gradient)
        loss = loss_with_gradient(loss_sum / total, params, deltas)
        return StepOutput(loss=loss, weight=1, num_samples=int(total.item()))  # once a round

    def _controls(self, model: nn.Module) -> Controls:
        if self.server is None:
            raise ValueError("control_variates needs the federated mode's server optimizer")
        params = [p for p in model.parameters() if p.requires_grad]
        return Controls(self.server, params, len(self.clients), self._client_lr())

    def _client_lr(self) -> float:
        return self.server.param_groups[0]["lr"] if self.server else self.config.learning_rate

    def _client_steps(self, loader: Any) -> int:
        return self.settings.local_epochs * len(loader)

    def _train_client(
        self, model: nn.Module, loader: Any, seed: int, correction: Any = None
    ) -> tuple[nn.Module, torch.Tensor, int]:
        """Train a copy of `model` on one client; returns it, its summed loss and samples."""
        if self._worker is None:
            self._worker = copy.deepcopy(model)
        worker = self._worker
        worker.load_state_dict(model.state_dict())
        client_lr = self._client_lr()
        job = ClientRound(
            client_lr, seed, self.settings.local_epochs, self.settings.proximal_mu, correction
        )
        loss_sum, samples = train_client(
            worker, loader, self.supervised, self.config, self.precision, job
        )
        return worker, loss_sum, samples


class Controls:
    """SCAFFOLD's control variates for one round (option II of Karimireddy et al., 2020):
    the server's `c` and each client's `c_i`, kept per parameter in the server optimizer's
    state (so checkpoints carry them). A client trains with its gradients corrected by
    `c - c_i`; after K local steps at rate lr its control becomes `c_i - c + (x - y_i) /
    (K lr)`; the server's moves by the sum of the clients' changes over all N clients."""

    def __init__(
        self, server: torch.optim.Optimizer, params: Sequence[torch.Tensor], clients: int, lr: float
    ) -> None:
        self.params, self.clients, self.lr = params, clients, lr
        self.states = [server.state[p] for p in params]
        for p, state in zip(params, self.states, strict=True):
            if "control" not in state:
                state["control"] = torch.zeros_like(p, dtype=torch.float32)
                state["client_controls"] = torch.zeros(
                    (clients, *p.shape), dtype=torch.float32, device=p.device
                )
        self.changes = [torch.zeros_like(state["client_controls"]) for state in self.states]

    def correction(self, client: int) -> list[torch.Tensor]:
        """`c - c_i` for each parameter."""
        return [
            (state["control"] - state["client_controls"][client]).to(p.dtype)
            for p, state in zip(self.params, self.states, strict=True)
        ]

    def record(self, client: int, model: nn.Module, worker: nn.Module, steps: int) -> None:
        """The client's new control from its update `x - y_i` over `steps` local steps."""
        trained = [p for p in worker.parameters() if p.requires_grad]
        for x, y, state, change in zip(
            self.params, trained, self.states, self.changes, strict=True
        ):
            # c_i+ - c_i = (x - y_i) / (K lr) - c
            change[client] = (x.detach() - y.detach()).float() / (steps * self.lr) - state[
                "control"
            ]

    def apply(self, job: Distributed) -> None:
        """Every rank's clients' changes (one all-reduce), then `c_i += change_i` and
        `c += sum(change_i) / N`."""
        job.sum_in_place(self.changes, "SCAFFOLD's control variates")
        for state, change in zip(self.states, self.changes, strict=True):
            state["client_controls"].add_(change)
            state["control"].add_(change.sum(0) / self.clients)


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A client's seed for a round (its shuffle and dropout): fixed by the run seed, the
    round (from 1) and the client (its index; on Flower, the node's `partition-id`)."""
    return (seed * 1_000_003 + server_round * 10_007 + client) % 2**62


@dataclasses.dataclass(frozen=True)
class ClientRound:
    """What one round asks of a client: its learning rate, its seed (`client_seed`), the
    local epochs, FedProx's `proximal_mu` (0: none) and SCAFFOLD's `correction` (one tensor
    per trainable parameter, on the model's device; None: none)."""

    lr: float
    seed: int
    local_epochs: int = 1
    proximal_mu: float = 0.0
    correction: Sequence[torch.Tensor] | None = None


def train_client(
    model: nn.Module,
    loader: Any,
    step: SupervisedStep,
    config: Any,
    precision: Precision,
    job: ClientRound,
) -> tuple[torch.Tensor, int]:
    """One client's local training, in place: `job.local_epochs` over `loader` (plus
    FedProx's proximal term to the weights it started from when `job.proximal_mu` > 0;
    SCAFFOLD's `job.correction` added to every gradient) with a fresh configured optimizer
    at `job.lr`, clipping and `precision` (fp16: its own GradScaler).

    Its randomness comes from `job.seed` alone: the loader's sampler generator (this round's
    shuffle) where it has one, and a forked global generator (a shuffle without one,
    dropout), so it does not depend on which clients trained before it, or on which rank or
    node. Returns the summed loss (a device tensor: no sync) and the samples trained on. Shared by
    the in-process simulation (`FederatedStep`) and Flower's ClientApp
    (`traineval.federated.flower`).
    """
    model.train()
    local = _LocalTraining(model, step, config, precision, job)
    sampler_generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if isinstance(sampler_generator, torch.Generator):
        sampler_generator.manual_seed(job.seed)
    device = local.device
    loss_sum = torch.zeros((), device=device)
    samples = 0
    # The loop runs the federated step inside its autocast context: leave it for the backward
    # passes, and enter the precision's own context around each client forward pass.
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.autocast(device.type, enabled=False):
        torch.manual_seed(job.seed)
        for _ in range(job.local_epochs):
            for batch in loader:
                if device.type != "cpu":
                    batch = move_to_device(batch, device)
                out = local.update(batch)
                loss_sum += out.loss.detach().float() * out.num_samples
                samples += out.num_samples
    if samples == 0:
        raise ValueError("a federated client's loader yielded no batches")
    return loss_sum, samples


class _LocalTraining:
    """A client's optimizer, scaler and extra terms for one round; `update` takes one step."""

    def __init__(
        self,
        model: nn.Module,
        step: SupervisedStep,
        config: Any,
        precision: Precision,
        job: ClientRound,
    ) -> None:
        self.model, self.step, self.config, self.precision, self.job = (
            model,
            step,
            config,
            precision,
            job,
        )
        self.optimizer = configured_optimizer(model, config, lr=job.lr)
        self.device = _device(model)
        use_scaler = precision.scaler is not None
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the global weights the round started from, for FedProx's proximal term
        self.anchor = [p.detach().clone() for p in self.params] if job.proximal_mu else []

    def update(self, batch: Any) -> Any:
        """One optimizer step on `batch` (forward under the precision's autocast, the
        proximal term, SCAFFOLD's correction, clipping); the step's output."""
        with self.precision.autocast():
            out = self.step(self.model, batch)
        objective = out.loss
        if self.anchor:
            objective = objective + _proximal(self.params, self.anchor, self.job.proximal_mu)
        scaler, optimizer = self.scaler, self.optimizer
        (scaler.scale(objective) if scaler is not None else objective).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.job.correction is not None:
            _correct(self.params, self.job.correction)
        if self.config.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out


def _correct(params: Sequence[torch.Tensor], correction: Sequence[torch.Tensor]) -> None:
    """SCAFFOLD's gradient correction, in place."""
    for p, term in zip(params, correction, strict=True):
        if p.grad is not None:
            p.grad.add_(term)


def _proximal(params: Sequence[Any], anchor: Sequence[torch.Tensor], mu: float) -> Any:
    """FedProx's term `mu / 2 * ||w - w_global||^2`."""
    return mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sum_dtype(value: torch.Tensor) -> torch.dtype:
    """The dtype a round sums a weight's client values in: at least float32 (half and
    integer entries too), float64 and complex ones as they are."""
    return torch.promote_types(value.dtype, torch.float32)
