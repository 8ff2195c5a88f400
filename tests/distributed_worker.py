"""Scenarios run under torchrun by tests/test_distributed.py (one process per rank).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 \
    tests/distributed_worker.py SCENARIO OUT_DIR

Each scenario trains or evaluates with traineval on gloo / CPU and writes what the test
compares (weights, metrics) into OUT_DIR as rank-suffixed files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import (
    EvaluationConfig,
    EvaluationOptions,
    Evaluator,
    TrainingConfig,
    TrainingManager,
    TrainingMode,
)
from traineval.callbacks import Callback
from traineval.config import TaskType
from traineval.modes import Reinforcement


def data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(x, y)


def regression_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(8, 8, generator=generator)
    return TensorDataset(x, torch.randn(8, 3, generator=generator))


def model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def config(out: Path, **overrides: Any) -> TrainingConfig:
    values: dict[str, Any] = {
        "num_epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.05,
        "warmup_steps": 2,
        "max_grad_norm": 0.5,
        "tensorboard_logging": False,
        "progress_bar": False,
        "mixed_precision": False,
        "device": "cpu",
        "log_frequency": 2,
        "eval_frequency": 3,
        "early_stopping_patience": 0,
        "output_dir": str(out),
        "distributed_timeout_seconds": 60.0,
    }
    values.update(overrides)
    return TrainingConfig(**values)


EQUIVALENCE_RUNS = (("plain", 16, 1), ("accumulated", 8, 2))  # name, batch, accumulation


def train_equivalence_run(
    net: nn.Module, out: Path, batch: int, accumulation: int, **overrides: Any
) -> Any:
    """64 samples in batches of `batch` per rank; validation on 9 (5 + 4 per rank)."""
    manager = TrainingManager(
        config(out, batch_size=batch, gradient_accumulation_steps=accumulation, **overrides)
    )
    return manager.train(
        net,
        DataLoader(data(), batch_size=batch, shuffle=False),
        DataLoader(data(9, seed=5), batch_size=2),  # 3 and 2 batches per rank
        task_type=TaskType.CLASSIFICATION,
    )


def save_run(out: Path, name: str, rank: int, net: nn.Module, result: Any) -> None:
    """What the tests compare with one process: this rank's weights, train losses and
    validation metrics, as `<name>-weights-<rank>.pt` and `<name>-history-<rank>.json`."""
    torch.save(net.state_dict(), out / f"{name}-weights-{rank}.pt")
    history = result.training_history
    record = {"val_metrics": history["val_metrics"], "train_loss": history["train_loss"]}
    (out / f"{name}-history-{rank}.json").write_text(json.dumps(record))


def equivalence(out: Path, rank: int) -> None:
    """Batch 16 per rank, and batch 8 x 2 accumulated per rank, on 64 samples."""
    for name, batch, accumulation in EQUIVALENCE_RUNS:
        net = model()
        save_run(out, name, rank, net, train_equivalence_run(net, out / name, batch, accumulation))


def partly_labeled() -> TensorDataset:
    """`data()` with a third of the targets, and all of samples 8-15, marked unlabeled (-1):
    the ranks' micro-batches hold different numbers of labeled samples."""
    x, y = data().tensors
    y = y.clone()
    y[::3] = -1
    y[8:16] = -1
    return TensorDataset(x, y)


def semi_supervised(out: Path, rank: int) -> None:
    """Semi-supervised, batch 8 x 2 accumulated per rank: the reference is one process at 32."""
    net = model()
    TrainingManager(
        config(
            out,
            batch_size=8,
            gradient_accumulation_steps=2,
            mode_settings={"semi_supervised": {"pseudo_label_threshold": 0.4}},
        )
    ).train(
        net,
        DataLoader(partly_labeled(), batch_size=8, shuffle=False),
        mode=TrainingMode.SEMI_SUPERVISED,
    )
    torch.save(net.state_dict(), out / f"semi-weights-{rank}.pt")


def meta_tasks(count: int, seed: int) -> Any:
    """Few-shot tasks (3-way 2-shot, 3 queries) over 5 Gaussian classes of 8 features."""
    from traineval.data import Episodes

    generator = torch.Generator().manual_seed(4)
    centers = torch.randn(5, 8, generator=generator) * 2
    y = torch.arange(5).repeat_interleave(10)
    x = centers[y] + torch.randn(len(y), 8, generator=generator)
    return Episodes(TensorDataset(x, y), ways=3, shots=2, queries=3, episodes=count, seed=seed)


def meta_run(out: Path, batch: int) -> tuple[nn.Module, Any]:
    """MAML on 8 training tasks (batch `batch` per process), validation on 5 tasks."""
    net = model()
    result = TrainingManager(
        config(out, batch_size=batch, mode_settings={"meta_learning": {"inner_lr": 0.3}})
    ).train(
        net,
        DataLoader(meta_tasks(8, seed=0), batch_size=batch, shuffle=False),
        DataLoader(meta_tasks(5, seed=1), batch_size=2),  # 3 and 2 tasks per rank
        mode=TrainingMode.META_LEARNING,
    )
    return net, result


def meta_learning(out: Path, rank: int) -> None:
    """Two ranks of 2 tasks per update: the reference is one process at 4."""
    net, result = meta_run(out, batch=2)
    save_run(out, "meta", rank, net, result)


def federated_run(out: Path) -> tuple[nn.Module, Any]:
    """FedAvgM with SCAFFOLD's controls over 3 clients of 8, 16 and 24 samples, dropout on,
    3 rounds; validation on 9."""
    x, y = data().tensors
    clients = [
        DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=8, shuffle=True)
        for a, b in ((0, 8), (8, 24), (24, 48))
    ]
    net = model(dropout=0.2)
    federated = {"local_epochs": 2, "server_momentum": 0.5, "control_variates": True}
    settings: dict[str, Any] = {"num_epochs": 3, "mode_settings": {"federated": federated}}
    settings.update(optimizer_type="sgd", momentum=0.0, weight_decay=0.0)  # SCAFFOLD's clients
    result = TrainingManager(config(out, **settings)).train(
        net, clients, DataLoader(data(9, seed=5), batch_size=2), mode=TrainingMode.FEDERATED
    )
    return net, result


def federated(out: Path, rank: int) -> None:
    """Rank 0 trains clients 0 and 2 of each round, rank 1 client 1."""
    net, result = federated_run(out)
    save_run(out, "federated", rank, net, result)


RECORDED: list[dict[str, Any]] = []  # every episode this process played, in order


class RecordingCartPole:
    """CartPole that writes down each episode's observations, actions and rewards."""

    def __init__(self) -> None:
        from traineval.modes.envs import CartPole

        self.env = CartPole()
        self.episode: dict[str, Any] = {}

    def reset(self, seed: int | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed)
        self.episode = {"obs": [obs], "actions": [], "rewards": [], "terminated": False}
        RECORDED.append(self.episode)
        return obs, info

    def step(self, action: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.episode["obs"].append(obs)
        self.episode["actions"].append(int(action))
        self.episode["rewards"].append(float(reward))
        self.episode["terminated"] = bool(terminated)
        return obs, reward, terminated, truncated, info


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.pi, self.v = nn.Linear(16, 2), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.pi(h), self.v(h)


RL_MODE: dict[str, Any] = {  # policy gradient
    "updates_per_epoch": 1,
    "episodes_per_update": 3,
    "max_episode_steps": 25,  # some episodes are cut off: their returns bootstrap
    "eval_episodes": 1,
}
RL_SETTINGS: dict[str, Any] = {
    "num_epochs": 1,
    "optimizer_type": "sgd",
    "momentum": 0.0,
    "weight_decay": 0.0,
    "gradient_clipping": False,
    "learning_rate": 0.1,
    "warmup_steps": 0,
    "scheduler_type": "constant",
}


def reinforcement(out: Path, rank: int) -> None:
    """One policy update from each rank's 3 episodes; save what a replay needs."""
    net = ActorCritic()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    TrainingManager(config(out, **RL_SETTINGS, mode_settings={"reinforcement": RL_MODE})).train(
        net, RecordingCartPole, mode=TrainingMode.REINFORCEMENT
    )
    episodes = [  # the update's episodes come first; validation's come after
        {
            "obs": torch.tensor(np.stack(e["obs"]), dtype=torch.float32),
            "actions": torch.tensor(e["actions"]),
            "rewards": torch.tensor(e["rewards"], dtype=torch.float64),
            "terminated": e["terminated"],
        }
        for e in RECORDED[: RL_MODE["episodes_per_update"]]
    ]
    torch.save(
        {"initial": initial, "final": net.state_dict(), "episodes": episodes},
        out / f"rl-{rank}.pt",
    )


class Correct:
    """A user's streaming metric: the count of correct predictions (its state is sent to
    the other ranks: a class at module level, as pickle needs)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        self.count += int((predictions.argmax(1) == targets).sum())

    def merge(self, other: Any) -> None:
        self.count += other.count

    def compute(self) -> float:
        return float(self.count)


def user_metrics() -> dict[str, Any]:
    """A torchmetrics metric, a streaming metric of a user's, and a scikit-learn function."""
    from sklearn.metrics import balanced_accuracy_score
    from torchmetrics.classification import MulticlassF1Score

    return {
        "tm_f1": MulticlassF1Score(3, average="macro"),
        "correct": Correct(),
        "balanced": balanced_accuracy_score,
    }


def uneven(out: Path, rank: int) -> None:
    """Rank 0 evaluates 5 samples, rank 1 three (batch 2): metrics of all 8, merged."""
    from traineval.system.distributed import setup

    job, _ = setup("cpu", "auto", 60.0)
    net = model()
    results = {}
    for task, dataset in (
        ("classification", data(8, seed=3)),
        ("regression", regression_data()),
    ):
        share = range(0, 5) if rank == 0 else range(5, 8)
        loader = DataLoader(torch.utils.data.Subset(dataset, list(share)), batch_size=2)
        mine = user_metrics() if task == "classification" else {}
        evaluator = Evaluator(EvaluationConfig(bootstrap_samples=50), metrics=mine)
        report = evaluator.evaluate(
            net, loader, device="cpu", task_type=TaskType(task),
            options=EvaluationOptions(distributed=job),
        )  # fmt: skip
        results[task] = report.metrics
        results[f"{task}_intervals"] = report.intervals
    empty = DataLoader(torch.utils.data.Subset(data(8, seed=3), [] if rank else [0]), batch_size=2)
    results["one_sample"] = Evaluator().evaluate_model(
        net, empty, "cpu", task_type=TaskType.CLASSIFICATION, distributed=job
    )
    (out / f"uneven-{rank}.json").write_text(json.dumps(results))


class SignalRankOne(Callback):
    """Rank 1 alone 'receives SIGTERM' after update `after` (3); the ranks stop together at
    the next log step (4), inside the epoch (5 updates per epoch)."""

    def __init__(self, after: int = 3) -> None:
        self.after = after

    def on_step_end(self, loop: Any) -> None:
        if loop.job.rank == 1 and loop.state.global_step == self.after:
            loop.request_interrupt("SIGTERM")


def resume_config(out: Path, **overrides: Any) -> TrainingConfig:
    return config(out, num_epochs=3, checkpoint_every_n_steps=2, **overrides)


# DDP's resume test also keeps a moving average of the weights (each rank its own copy of
# the same average): the final weights compared are the average
DDP_RESUME = {"ema_decay": 0.8, "ema_warmup": True}
if os.environ.get("TRAINEVAL_TEST_ASYNC") == "1":  # the same runs with background saves
    DDP_RESUME["async_checkpointing"] = True
# FSDP's resume test also keeps the best weights: the evaluation at update 5 is the best, and
# the run is stopped at 8 (`SignalRankOne(after=7)`), so the resumed run must get them from
# the checkpoint (each rank its shards, from the checkpoint's folder); and a moving average
# of the weights (each rank its shards of it): the best weights are the average's
FSDP_RESUME = {
    "distributed_strategy": "fsdp",
    "restore_best_weights": True,
    "ema_decay": 0.8,
    "ema_warmup": True,
}
if os.environ.get("TRAINEVAL_TEST_ASYNC") == "1":
    FSDP_RESUME["async_checkpointing"] = True
# restored best weights (in memory: no best.pt) and per-layer gradient norms under FSDP,
# with a moving average of the weights (each rank averages its shards; the best weights and
# the evaluations are the average's)
BEST_AND_LAYER_NORMS = {
    "restore_best_weights": True,
    "log_layer_grad_norms": True,
    "save_best_model": False,
    "ema_decay": 0.5,
}


def resume_loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    train = DataLoader(
        data(80), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    return train, DataLoader(data(9, seed=5), batch_size=4)


def resume_first(out: Path, rank: int) -> None:
    """An uninterrupted run, then one that a signal on rank 1 stops at update 4."""
    from traineval.training.loop import TrainingInterrupted

    net = model(dropout=0.3)
    TrainingManager(resume_config(out / "straight", **DDP_RESUME)).train(
        net, *resume_loaders(), task_type=TaskType.CLASSIFICATION
    )
    torch.save(net.state_dict(), out / f"straight-weights-{rank}.pt")
    net = model(dropout=0.3)
    try:
        TrainingManager(resume_config(out / "interrupted", **DDP_RESUME)).train(
            net, *resume_loaders(), task_type=TaskType.CLASSIFICATION, callbacks=[SignalRankOne()]
        )
    except TrainingInterrupted as stopped:
        (out / f"interrupted-{rank}.json").write_text(json.dumps({"message": str(stopped)}))


def resume_second(out: Path, rank: int) -> None:
    """A fresh model (other initial weights) resumed from the interrupted run's checkpoint."""
    torch.manual_seed(99)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    result = TrainingManager(resume_config(out / "interrupted", **DDP_RESUME)).train(
        net, *resume_loaders(), task_type=TaskType.CLASSIFICATION, resume_from="auto"
    )
    torch.save(net.state_dict(), out / f"resumed-weights-{rank}.pt")
    (out / f"resumed-{rank}.json").write_text(json.dumps({"global_step": result.global_step}))


def rl_resume_config(out: Path) -> TrainingConfig:
    mode = {**RL_MODE, "updates_per_epoch": 6, "episodes_per_update": 2}
    return config(
        out, checkpoint_every_n_steps=2, **RL_SETTINGS, mode_settings={"reinforcement": mode}
    )


def rl_resume_first(out: Path, rank: int) -> None:
    """Policy gradient, 6 updates: uninterrupted, then stopped by a signal on rank 1 at 4."""
    from traineval.training.loop import TrainingInterrupted

    net = ActorCritic()
    TrainingManager(rl_resume_config(out / "rl-straight")).train(
        net, "CartPole", mode=TrainingMode.REINFORCEMENT
    )
    torch.save(net.state_dict(), out / f"rl-straight-{rank}.pt")
    try:
        TrainingManager(rl_resume_config(out / "rl-interrupted")).train(
            ActorCritic(), "CartPole", mode=TrainingMode.REINFORCEMENT, callbacks=[SignalRankOne()]
        )
    except TrainingInterrupted as stopped:
        (out / f"rl-interrupted-{rank}.txt").write_text(str(stopped))


def rl_resume_second(out: Path, rank: int) -> None:
    net = ActorCritic()
    TrainingManager(rl_resume_config(out / "rl-interrupted")).train(
        net, "CartPole", mode=TrainingMode.REINFORCEMENT, resume_from="auto"
    )
    torch.save(net.state_dict(), out / f"rl-resumed-{rank}.pt")


PPO_MODE = Reinforcement(  # 4 minibatches x 2 passes: 8 updates per rollout; a stop at 4
    algorithm="ppo",  # is inside the first rollout
    envs=2,
    rollout_steps=8,
    minibatch_size=4,
    ppo_epochs=2,
    rollouts_per_epoch=2,
    max_episode_steps=25,
    eval_episodes=1,
)


def ppo_config(out: Path) -> TrainingConfig:
    return config(out, checkpoint_every_n_steps=2, **RL_SETTINGS)


def ppo_resume_first(out: Path, rank: int) -> None:
    """PPO, 16 updates: uninterrupted, then stopped by a signal on rank 1 at update 4."""
    from traineval.training.loop import TrainingInterrupted

    net = ActorCritic()
    TrainingManager(ppo_config(out / "ppo-straight")).train(net, "CartPole", mode=PPO_MODE)
    torch.save(net.state_dict(), out / f"ppo-straight-{rank}.pt")
    try:
        TrainingManager(ppo_config(out / "ppo-interrupted")).train(
            ActorCritic(), "CartPole", mode=PPO_MODE, callbacks=[SignalRankOne()]
        )
    except TrainingInterrupted as stopped:
        (out / f"ppo-interrupted-{rank}.txt").write_text(str(stopped))


def ppo_resume_second(out: Path, rank: int) -> None:
    """Resumed with each rank's environments in worker processes (the same episodes)."""
    net = ActorCritic()
    workers = dataclasses.replace(PPO_MODE, vectorization="async")
    TrainingManager(ppo_config(out / "ppo-interrupted")).train(
        net, "CartPole", mode=workers, resume_from="auto"
    )
    torch.save(net.state_dict(), out / f"ppo-resumed-{rank}.pt")


class FailOnRankOne(Callback):
    def on_step_end(self, loop: Any) -> None:
        if loop.job.rank == 1 and loop.state.global_step == 3:
            raise RuntimeError("rank 1 failed on purpose")


def failure(out: Path, rank: int) -> None:
    """Rank 1 raises at update 3; rank 0 must not hang."""
    TrainingManager(config(out / "failure", num_epochs=50, distributed_timeout_seconds=20)).train(
        model(), DataLoader(data(), batch_size=8, shuffle=True), callbacks=[FailOnRankOne()]
    )


class FailingCount:
    """A streaming metric whose update fails on rank 1 only (a bad batch, a metric's bug)."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        if os.environ["RANK"] == "1":
            raise RuntimeError("update failed on rank 1")
        self.n += len(targets)

    def compute(self) -> float:
        return float(self.n)

    def reset(self) -> None:
        self.n = 0

    def merge(self, other: FailingCount) -> None:
        self.n += other.n


def validation_failure(out: Path, rank: int, strategy: str = "ddp") -> None:
    """Rank 1's validation fails in a metric; with the default timeout (600 s) rank 0 waited
    in the metrics' gather for it while rank 1 waited at the checkpoint's barrier. Under
    FSDP (evaluation in lockstep) rank 0 waited in the next batch's forward."""
    from traineval.evaluation.model_evaluator import ModelEvaluator

    evaluator = ModelEvaluator(metrics={"count": FailingCount()})
    loaders = DataLoader(data(), batch_size=8), DataLoader(data(16, seed=3), batch_size=4)
    name = "validation-failure" + ("" if strategy == "ddp" else f"-{strategy}")
    settings = config(out / name, num_epochs=3, distributed_strategy=strategy)
    try:
        TrainingManager(settings).train(
            Blocks() if strategy == "fsdp" else model(), *loaders, evaluator=evaluator
        )
    except Exception as error:
        theirs = " (user code)" if getattr(error, "user_code", False) else ""
        (out / f"{name}-{rank}.txt").write_text(f"{type(error).__name__}{theirs}: {error}")
        raise


def validation_failure_fsdp(out: Path, rank: int) -> None:
    validation_failure(out, rank, "fsdp")


class SlowSteps(Callback):
    """Updates of 0.3 s (a large model's), rank 1 signalled after update 3."""

    def on_step_end(self, loop: Any) -> None:
        time.sleep(0.3)
        if loop.job.rank == 1 and loop.state.global_step == 3:
            loop.request_interrupt("SIGTERM")


def signal_between_logs(out: Path, rank: int) -> None:
    """A signal far from a log step (log_frequency 1000) and an epoch's end (32 updates):
    the ranks agree on it within AGREE_SECONDS of updates (they waited for the epoch's end,
    past torchrun's 30 s before it kills its workers)."""
    from traineval.training.loop import TrainingInterrupted

    loader = DataLoader(data(512), batch_size=8)
    try:
        TrainingManager(config(out / "between-logs", log_frequency=1000, num_epochs=1)).train(
            model(), loader, callbacks=[SlowSteps()]
        )
    except TrainingInterrupted as stopped:
        (out / f"between-logs-{rank}.txt").write_text(str(stopped))


class HangOnRankOne(Callback):
    def on_step_end(self, loop: Any) -> None:
        if loop.job.rank == 1 and loop.state.global_step == 3:
            time.sleep(600)


def hang(out: Path, rank: int) -> None:
    """Rank 1 stops answering at update 3; rank 0's next collective must time out."""
    TrainingManager(config(out / "hang", num_epochs=50, distributed_timeout_seconds=5)).train(
        model(), DataLoader(data(), batch_size=8, shuffle=True), callbacks=[HangOnRankOne()]
    )


class Blocks(nn.Module):
    """A model with a ModuleList, so FSDP shards each block as its own unit."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16)])
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.drop(torch.relu(block(x)))
        return self.head(x)


def no_gathering() -> Any:
    """Under FSDP `BestWeights` keeps each rank's shards: gathering the full weights to keep
    or to restore them is an error in the block."""
    import traineval.callbacks.checkpointing as checkpointing

    def refuse(*args: Any) -> None:
        raise AssertionError("BestWeights gathered the full weights")

    return mock.patch.multiple(checkpointing, model_state=refuse, load_model_state=refuse)


@contextlib.contextmanager
def recording_shard_writes(path: Path) -> Iterator[None]:
    """Record in `path` each write this rank's background shard writer performs (its kind
    and thread), if any."""
    from traineval.runs.shard_writer import ShardWriter

    done: list[list[str]] = []
    perform = ShardWriter._perform

    def spy(self: Any, write: Any) -> None:
        done.append([write.kind, threading.current_thread().name])
        perform(self, write)

    with mock.patch.object(ShardWriter, "_perform", spy):
        yield
    path.write_text(json.dumps(done))


def fsdp(out: Path, rank: int) -> None:
    """FSDP: plain and accumulated equivalence runs, one that restores the best weights and
    logs per-layer gradient norms, then a run stopped at update 4."""
    from traineval.system.distributed import is_sharded, model_state
    from traineval.training.loop import TrainingInterrupted

    for plain_name, batch, accumulation in EQUIVALENCE_RUNS:
        name = f"fsdp-{plain_name}"
        net = Blocks()
        result = train_equivalence_run(
            net, out / name, batch, accumulation, distributed_strategy="fsdp"
        )
        weights = model_state(net)  # every rank takes part; rank 0 receives
        if rank == 0:
            torch.save(weights, out / f"{name}-weights.pt")
            history = result.training_history
            record = {
                "val_metrics": history["val_metrics"],
                "train_loss": history["train_loss"],
                "sharded": is_sharded(net),
                "units": sum(type(m).__name__.startswith("FSDP") for m in net.modules()),
            }
            (out / f"{name}-history.json").write_text(json.dumps(record))
    net = Blocks()
    with no_gathering():
        result = train_equivalence_run(
            net, out / "fsdp-best", 16, 1, distributed_strategy="fsdp", **BEST_AND_LAYER_NORMS
        )
    weights = model_state(net)
    if rank == 0:
        torch.save(weights, out / "fsdp-best-weights.pt")
        (out / "fsdp-best.json").write_text(json.dumps({"best_epoch": result.best_epoch}))
    net = Blocks(dropout=0.3)
    with no_gathering(), recording_shard_writes(out / f"fsdp-writes-{rank}.json"):
        TrainingManager(resume_config(out / "fsdp-straight", **FSDP_RESUME)).train(
            net, *resume_loaders(), task_type=TaskType.CLASSIFICATION
        )
    weights = model_state(net)
    if rank == 0:
        torch.save(weights, out / "fsdp-straight-weights.pt")
    # stopped runs to resume: sharded checkpoints (no rank gathers), and full ones
    for name, sharding in (("fsdp-interrupted", "auto"), ("fsdp-interrupted-gathered", "full")):
        try:
            with no_gathering() if sharding == "auto" else contextlib.nullcontext():
                TrainingManager(
                    resume_config(out / name, checkpoint_sharding=sharding, **FSDP_RESUME)
                ).train(
                    Blocks(dropout=0.3),
                    *resume_loaders(),
                    task_type=TaskType.CLASSIFICATION,
                    callbacks=[SignalRankOne(after=7)],
                )
        except TrainingInterrupted as stopped:
            (out / f"{name}-{rank}.json").write_text(json.dumps({"message": str(stopped)}))


def fsdp_resume(out: Path, rank: int) -> None:
    """Resume the stopped FSDP runs, each from other starting weights (the checkpoint must
    win), and save the weights each ends with as `{name}-weights.pt` (rank 0)."""
    full = {**FSDP_RESUME, "checkpoint_sharding": "full"}
    with no_gathering():  # sharded checkpoints: each rank reads its shards
        resume_fsdp_run(out, rank, "fsdp-interrupted", "fsdp-resumed", FSDP_RESUME)
    # the same checkpoint resumed with full checkpoints: the best shards read back whole
    resume_fsdp_run(out, rank, "fsdp-interrupted-full", "fsdp-resumed-full", full)
    # a run that wrote full checkpoints, resumed under FSDP: each rank cuts its shards of
    # the saved average out of the file
    resume_fsdp_run(out, rank, "fsdp-interrupted-gathered", "fsdp-resumed-gathered", full)


def resume_fsdp_run(out: Path, rank: int, run: str, name: str, settings: dict[str, Any]) -> None:
    from traineval.system.distributed import model_state

    torch.manual_seed(99)
    net = Blocks(dropout=0.3)
    for param in net.parameters():
        torch.nn.init.normal_(param)
    TrainingManager(resume_config(out / run, **settings)).train(
        net, *resume_loaders(), task_type=TaskType.CLASSIFICATION, resume_from="auto"
    )
    weights = model_state(net)
    if rank == 0:
        torch.save(weights, out / f"{name}-weights.pt")


class Counting(nn.Module):
    """Blocks with a module that keeps extra state (`get_extra_state`): its count of calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Blocks()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]


class BestCount(Callback):
    """The model's count of calls at its best evaluation (the extra state its best holds)."""

    calls: int | None = None

    def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
        if logs.get("improved"):
            self.calls = loop.model.calls


def fsdp_edges(out: Path, rank: int) -> None:
    """FSDP's sharded saves where they can break: rank 0 alone cannot write
    best.safetensors (a full disk), written in place and in the background (every rank must
    say it); and a model with extra state keeps its best weights across a resume."""
    import errno

    import traineval.runs.shard_export as shard_export
    from traineval.system.files import WriteError
    from traineval.training.loop import TrainingInterrupted

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    said = {}
    for background in (False, True):
        name = f"export-fails-{'async' if background else 'sync'}"
        patch = mock.patch.object(shard_export, "tensor_view", full_disk)
        with patch if rank == 0 else contextlib.nullcontext():
            try:
                TrainingManager(
                    resume_config(out / name, **FSDP_RESUME, async_checkpointing=background)
                ).train(Blocks(), *resume_loaders(), task_type=TaskType.CLASSIFICATION)
                said[name] = None
            except WriteError as error:
                said[name] = str(error)
    settings = {**FSDP_RESUME, "eval_frequency": 2}
    straight, best = Counting(), BestCount()
    TrainingManager(resume_config(out / "extra-straight", **settings)).train(
        straight, *resume_loaders(), callbacks=[best]
    )
    said["best_calls"], said["straight_calls"] = best.calls, straight.calls
    with contextlib.suppress(TrainingInterrupted):  # after the best's evaluation
        TrainingManager(resume_config(out / "extra", **settings)).train(
            Counting(), *resume_loaders(), callbacks=[SignalRankOne(after=7)]
        )
    net = Counting()
    TrainingManager(resume_config(out / "extra", **settings)).train(
        net, *resume_loaders(), resume_from="auto"
    )
    said["calls"] = net.calls
    (out / f"edges-{rank}.json").write_text(json.dumps(said))


def fsdp_load(out: Path, rank: int) -> None:
    """Every rank of a job of any size: load the sharded checkpoints of the 2-rank run
    `fsdp-plain` and of one process (`single-sharded`) into an FSDP-sharded `Blocks` and
    its optimizer; rank 0 saves the full weights as `loaded-<source>-<world size>.pt`."""
    from torch.distributed.fsdp import fully_shard

    import traineval
    from traineval.system.distributed import model_state, optimizer_state

    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    for source in ("fsdp-plain", "single-sharded"):
        net = Blocks()
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1.0)
        path = out / source / "checkpoints" / "last.pt"
        traineval.load_checkpoint(path, net, optimizer=optimizer)
        weights, state = model_state(net), optimizer_state(net, optimizer)
        if rank == 0:
            torch.save({"model": weights, "optimizer": state}, out / f"loaded-{source}-{world}.pt")
    torch.distributed.destroy_process_group()


def gpt2(out: Path, rank: int) -> None:
    """A tiny GPT-2 on padded rows with its own loss, batch 8 per rank (2 x 8 = 16)."""
    from test_huggingface import exact_config, padded_lm_rows, tiny_gpt2

    net = tiny_gpt2()
    config = exact_config(out, "gpt2", batch_size=8, distributed_timeout_seconds=60.0)
    TrainingManager(config).train(net, DataLoader(padded_lm_rows(), batch_size=8))
    torch.save(net.state_dict(), out / f"gpt2-weights-{rank}.pt")


def protonet_run(out: Path, batch: int) -> tuple[nn.Module, Any]:
    """A user's own Mode (tests/test_own_mode.py's ProtoNet): 8 tasks, batch `batch` per
    process, DDP-wrapped like a built-in supervised model; validation on 5 tasks."""
    from test_own_mode import ProtoNet

    net = model()
    # plain SGD: the last layer's bias gets no gradient but rounding noise (distances do not
    # move with a shared shift), which Adam would blow up to full-size steps
    sgd = {"optimizer_type": "sgd", "momentum": 0.0, "weight_decay": 0.0}
    result = TrainingManager(config(out, batch_size=batch, **sgd)).train(
        net,
        DataLoader(meta_tasks(8, seed=0), batch_size=batch, shuffle=False),
        DataLoader(meta_tasks(5, seed=1), batch_size=5),
        mode=ProtoNet(ways=3),
    )
    return net, result


def protonet(out: Path, rank: int) -> None:
    net, result = protonet_run(out, batch=2)
    save_run(out, "protonet", rank, net, result)


def tune_ranks(out: Path, rank: int) -> None:
    """`traineval.tune` under torchrun: 5 good trials, then one that cannot learn (pruned on
    rank 0's word; every rank must stop with it or the job hangs)."""
    from traineval.commands.experiment import RunConfig
    from traineval.tuning import tune
    from traineval.tuning.study import TuneOptions, open_study, prepare

    config = RunConfig.from_dict(
        {
            "data": {"name": "iris"},
            "model": {"name": "mlp", "options": {"hidden_sizes": [16]}},
            "training": {
                "num_epochs": 4,
                "batch_size": 8,
                "warmup_steps": 0,
                "learning_rate": 3e-3,
                "early_stopping_patience": 0,
                "monitor_metric": "val_accuracy",
                "progress_bar": False,
                "tensorboard_logging": False,
                "output_dir": str(out / "study"),
            },
        }
    )
    search = {"learning_rate": {"low": 1e-8, "high": 1e-1, "log": True}}
    if rank == 0:
        settings = prepare(config, search, TuneOptions(trials=6))
        study = open_study(settings)
        for rate in (3e-3,) * 5 + (1e-8,):
            study.enqueue_trial({"training.learning_rate": rate})
    result = tune(config, search, trials=6)
    record = None if result is None else [(t["number"], t["state"]) for t in result.trials]
    (out / f"tune-{rank}.json").write_text(json.dumps({"trials": record}))


SCENARIOS = {
    "tune_ranks": tune_ranks,
    "protonet": protonet,
    "gpt2": gpt2,
    "equivalence": equivalence,
    "uneven": uneven,
    "semi_supervised": semi_supervised,
    "meta_learning": meta_learning,
    "federated": federated,
    "reinforcement": reinforcement,
    "rl_resume_first": rl_resume_first,
    "rl_resume_second": rl_resume_second,
    "ppo_resume_first": ppo_resume_first,
    "ppo_resume_second": ppo_resume_second,
    "resume_first": resume_first,
    "resume_second": resume_second,
    "failure": failure,
    "validation_failure": validation_failure,
    "validation_failure_fsdp": validation_failure_fsdp,
    "signal_between_logs": signal_between_logs,
    "hang": hang,
    "fsdp": fsdp,
    "fsdp_resume": fsdp_resume,
    "fsdp_load": fsdp_load,
    "fsdp_edges": fsdp_edges,
}


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    SCENARIOS[scenario](folder, int(os.environ["RANK"]))
