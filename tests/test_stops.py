"""Every way a run stops records where it stopped: a resume from there ends equal to the run
that never stopped (every parameter, buffer and optimizer tensor; the same update count)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from test_consistency import _partly_labeled
from test_meta_learning import _episodes
from test_ppo import PPO
from test_reinforcement import RL, ActorCritic, Walk
from traineval import Callback, TrainingManager
from traineval.loggers import read_jsonl
from traineval.models import VAE
from traineval.modes import (
    Federated,
    MetaLearning,
    Mode,
    ModePlan,
    SemiSupervised,
    StepOutput,
    Unsupervised,
)
from traineval.runs.checkpoint import load_checkpoint_file, load_model_weights
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, make_classification, plain_sgd_config
from test_resume import assert_same_state


class PenaltyStep:
    """A user's step: cross-entropy plus an L2 penalty on the outputs."""

    def __init__(self, weight: float) -> None:
        self.weight_of_penalty = weight

    def weight(self, batch: Any) -> int:
        return len(batch[1])

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) + self.weight_of_penalty * out.pow(2).mean()
        return StepOutput(loss=loss, weight=len(y), num_samples=len(y))


@dataclasses.dataclass(frozen=True)
class Penalised(Mode):
    """A user's own mode, unregistered: trained by instance."""

    name: ClassVar[str] = "penalised_stops_test"
    penalty: float = 0.01

    def plan(self, ctx: Any) -> ModePlan:
        return ModePlan(PenaltyStep(self.penalty))


def _mlp_with_batch_norm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)
    )


def _shuffled(data: Any, batch_size: int = 8) -> DataLoader:
    return DataLoader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(4))


def _vae() -> nn.Module:
    torch.manual_seed(0)
    return VAE(8, hidden_sizes=(6,), latent_dim=2)


@dataclasses.dataclass
class Case:
    """One mode's tiny run: `model()`, `data()` -> (train, val), its mode and settings;
    `stop_at`: a max_steps inside an epoch (where the mode has several updates an epoch)."""

    model: Any
    data: Any
    mode: Any
    stop_at: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _classification() -> tuple[Any, Any]:
    val = DataLoader(make_classification(n=24, seed=1), batch_size=12)
    return _shuffled(make_classification(n=60)), val  # 8 batches an epoch


CASES = {
    "supervised": Case(_mlp_with_batch_norm, _classification, "supervised", 5),
    "users_mode": Case(_mlp_with_batch_norm, _classification, Penalised(), 11),
    "semi_supervised": Case(
        _mlp_with_batch_norm,
        lambda: (_shuffled(_partly_labeled()), None),
        SemiSupervised(algorithm="pseudo_label", pseudo_label_threshold=0.0),
        4,
    ),
    "unsupervised": Case(
        _vae, lambda: (_shuffled(make_classification(n=40)), None), Unsupervised("elbo"), 3
    ),
    "meta_learning": Case(
        lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)),
        lambda: (DataLoader(_episodes(), batch_size=2), None),
        MetaLearning(inner_lr=0.3, inner_steps=2),
        3,
    ),
    "policy_gradient": Case(ActorCritic, lambda: (Walk, None), RL, 4),
    "ppo": Case(ActorCritic, lambda: (Walk, None), PPO, 8),
    "federated": Case(
        _mlp_with_batch_norm,
        _classification,
        Federated(clients=4, client_fraction=0.5, local_epochs=1),
        2,  # one update (a round) an epoch: the stop falls between epochs
    ),
}


TIMING = re.compile(r"sec|wait|rss|memory|time")


def logged(folder: Any) -> list[dict[str, Any]]:
    """A run's metrics.jsonl records without their timings."""
    return [
        {k: v for k, v in record.items() if not TIMING.search(k)}
        for record in read_jsonl(folder / "metrics.jsonl")
    ]


def _train(case: Case, folder: Any, quiet_config: dict[str, Any], **length: Any) -> Any:
    quiet_config = {**quiet_config, "output_dir": str(folder)}
    resume, callbacks = length.pop("resume_from", None), length.pop("callbacks", ())
    settings = {"num_epochs": 3, "learning_rate": 0.05, "optimizer_type": "adamw", "seed": 7}
    settings["batch_size"] = 8
    config = plain_sgd_config(quiet_config, **{**settings, **case.settings, **length})
    torch.manual_seed(0)
    model = case.model()
    train, val = case.data()
    result = TrainingManager(config).train(
        model, train, val, mode=case.mode, resume_from=resume, callbacks=callbacks
    )
    return model, result


@pytest.mark.parametrize("name", list(CASES))
def test_a_max_steps_stop_then_a_longer_run_equals_the_uninterrupted_run(
    name, quiet_config, tmp_path, caplog
):
    case = CASES[name]
    straight, expected = _train(case, tmp_path / "straight", quiet_config)
    _, stopped = _train(case, tmp_path / "stopped", quiet_config, max_steps=case.stop_at)
    assert stopped["global_step"] == case.stop_at
    assert stopped["status"] == "finished"
    saved = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "last.pt")["loop"]
    assert saved["global_step"] == case.stop_at
    if name != "federated":  # the others stop with batches of the epoch left
        assert saved["batch_in_epoch"] > 0
    with caplog.at_level(logging.WARNING):
        resumed, result = _train(
            case, tmp_path / "stopped", quiet_config, max_steps=None, resume_from="auto"
        )
    assert "RESUMING WITH" not in caplog.text  # the constant schedule: nothing differs
    assert result["global_step"] == expected["global_step"]
    assert result["stop_reason"] == expected["stop_reason"]  # not the stopped run's max_steps
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")
    # the stop's closing validation and its part of an epoch are not in the resumed run's log
    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")


def test_a_resume_from_an_epoch_s_best_logs_that_epoch_once(quiet_config, tmp_path):
    """best.pt is written in the epoch's validation, before its `epoch` record: a resume
    from it (a corrupt last.pt falls back to it) kept that record beside the resumed run's
    own, by step, so the epoch showed twice in metrics.jsonl and the report."""
    case = CASES["supervised"]
    _train(case, tmp_path / "straight", quiet_config)
    with pytest.raises(TrainingInterrupted):
        _train(case, tmp_path / "run", quiet_config, callbacks=[InterruptAt(12)])
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert load_checkpoint_file(best)["global_step"] == 8  # epoch 1's end
    _train(case, tmp_path / "run", quiet_config, resume_from=str(best))
    assert logged(tmp_path / "run") == logged(tmp_path / "straight")


@pytest.mark.parametrize("name", ["ppo", "supervised"])
def test_a_stop_inside_a_log_interval_logs_the_uninterrupted_means(name, quiet_config, tmp_path):
    """A stop inside a log interval reads its steps' metrics in two parts: summed in float32
    per part, PPO's train_entropy came out in another 8th digit after the resume."""
    case = CASES[name]
    _train(case, tmp_path / "straight", quiet_config, log_frequency=4)
    with pytest.raises(TrainingInterrupted):
        _train(case, tmp_path / "run", quiet_config, log_frequency=4, callbacks=[InterruptAt(6)])
    _train(case, tmp_path / "run", quiet_config, log_frequency=4, resume_from="auto")
    assert logged(tmp_path / "run") == logged(tmp_path / "straight")


def test_a_max_steps_stop_with_its_epoch_end_save_put_off_resumes_exactly(
    quiet_config, tmp_path, monkeypatch
):
    """Where the write budget puts the epoch-end `last` off to the run's end (many small
    epochs), the stopped run's closing evaluation stayed out of the resume point only for
    saves asked at once: the put-off one overwrote it after that evaluation."""
    from traineval.runs.checkpoint_writer import WriteBudget

    monkeypatch.setattr(WriteBudget, "allows", lambda self: False)
    case = dataclasses.replace(
        CASES["supervised"], settings={"restore_best_weights": True, "eval_frequency": 2}
    )
    straight, expected = _train(case, tmp_path / "straight", quiet_config)
    _train(case, tmp_path / "stopped", quiet_config, max_steps=case.stop_at)
    saved = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "last.pt")["loop"]
    assert saved["global_step"] == case.stop_at
    assert saved["last_eval_step"] < case.stop_at  # not the closing evaluation's
    resumed, result = _train(
        case, tmp_path / "stopped", quiet_config, max_steps=None, resume_from="auto"
    )
    history = result["training_history"]
    assert history["val_steps"] == expected["training_history"]["val_steps"]
    assert history["train_loss"] == expected["training_history"]["train_loss"]
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")


def test_the_resume_warning_names_the_plans_only_when_they_differ(quiet_config, tmp_path, caplog):
    case = dataclasses.replace(
        CASES["supervised"], settings={"scheduler_type": "cosine", "warmup_steps": 2}
    )
    _train(case, tmp_path, quiet_config, max_steps=5)
    with caplog.at_level(logging.WARNING):
        _train(case, tmp_path, quiet_config, max_steps=None, resume_from="auto")
    assert (
        "the cosine schedule was planned as warmup 2 over 5 updates and is now warmup 2 over "
        "24 updates; from update 5 on the learning rate follows the new plan" in caplog.text
    )
    onecycle = dataclasses.replace(CASES["supervised"], settings={"scheduler_type": "onecycle"})
    _train(onecycle, tmp_path / "one", quiet_config, max_steps=5)
    with pytest.raises(ValueError, match=r"onecycle schedule was planned over 5 optimizer upd"):
        _train(onecycle, tmp_path / "one", quiet_config, max_steps=None, resume_from="auto")


class SignallingLoader:
    """A validation loader that sends this process a real SIGTERM while it is iterated for
    the `at`-th time (the epoch-`at` validation)."""

    def __init__(self, loader: DataLoader, at: int) -> None:
        self.loader, self.at, self.count = loader, at, 0
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        self.count += 1
        for i, batch in enumerate(self.loader):
            if i == 1 and self.count == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_sigterm_during_validation_interrupts_and_resumes_exactly(quiet_config, tmp_path):
    case = CASES["supervised"]
    straight, expected = _train(case, tmp_path / "straight", quiet_config)
    val = case.data()[1]
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at epoch 1, step 8 during valid"):
        _train_with(case, tmp_path / "stopped", quiet_config, SignallingLoader(val, 1))
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert "during validation" in summary["stop_reason"]
    saved = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "last.pt")["loop"]
    assert (saved["epoch"], saved["global_step"], saved["finished"]) == (1, 8, False)
    resumed, result = _train(case, tmp_path / "stopped", quiet_config, resume_from="auto")
    assert result["global_step"] == expected["global_step"]
    assert result["status"] == "finished"
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")


def _train_with(case: Case, folder: Any, quiet_config: dict[str, Any], val: Any) -> Any:
    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(folder)},
        num_epochs=3,
        batch_size=8,
        learning_rate=0.05,
        optimizer_type="adamw",
        seed=7,
    )
    torch.manual_seed(0)
    model = case.model()
    train, _ = case.data()
    return TrainingManager(config).train(model, train, val, mode=case.mode)


def _signal_on_call(monkeypatch: Any, owner: Any, name: str, at: int) -> None:
    """Replace `owner.name` by a wrapper that sends SIGTERM to this process inside its
    `at`-th call, then finishes the call."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("phase", ["validation", "checkpoint write", "test evaluation"])
def test_a_sigterm_in_any_phase_of_fit_exits_143_and_resumes_to_the_same_run(
    phase, tmp_path, monkeypatch, capsys
):
    from traineval.cli import main
    from traineval.commands import experiment
    from traineval.evaluation.model_evaluator import ModelEvaluator
    from traineval.training import run_checkpoints

    from conftest import iris_demo

    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(iris_demo(straight, "training.num_epochs=3")) == 0
    with monkeypatch.context() as patch:
        if phase == "validation":  # epoch 2's
            _signal_on_call(patch, ModelEvaluator, "evaluate_model", 2)
        elif phase == "checkpoint write":  # the run's first: epoch 1's best.pt
            _signal_on_call(patch, run_checkpoints, "save_checkpoint_file", 1)
        else:
            _signal_on_call(patch, experiment, "_evaluate_split", 1)
        capsys.readouterr()
        assert main(iris_demo(run, "training.num_epochs=3")) == 143
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("traineval")]
    assert len(err) == 1, err
    assert f"training.output_dir={run} --resume auto" in err[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert not (run / "evaluation" / "metrics.json").exists()  # no test results
    assert main(["report", str(run)]) == 0
    assert "interrupted (" in capsys.readouterr().out  # the report does not say finished
    assert main([*iris_demo(run, "training.num_epochs=3"), "--resume", "auto"]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    ours = load_checkpoint_file(run / "checkpoints" / "last.pt")
    theirs = load_checkpoint_file(straight / "checkpoints" / "last.pt")
    assert ours["global_step"] == theirs["global_step"]
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    tested = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    assert tested == json.loads((straight / "evaluation" / "metrics.json").read_text())["test"]
    # the log too: an interrupted test evaluation's record is not kept beside the resumed one
    assert logged(run) == logged(straight)
    assert main([*iris_demo(run, "training.num_epochs=3"), "--resume", "auto"]) == 0
    assert logged(run) == logged(straight)  # nothing to train: the test is logged once


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    from traineval.cli import main
    from traineval.evaluation.model_evaluator import ModelEvaluator

    from conftest import iris_demo

    original = ModelEvaluator.evaluate_model

    def twice(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
        return original(*args, **kwargs)

    monkeypatch.setattr(ModelEvaluator, "evaluate_model", twice)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        capsys.readouterr()
        assert main(iris_demo(tmp_path / "run", "training.num_epochs=2")) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("traineval")]
    assert err == [
        "traineval: second SIGINT: stopping at once; the checkpoints written before it are "
        "kept (continue with --resume auto)"
    ]


class Snapshot(Callback):
    """Every parameter, buffer and optimizer tensor after each update's hooks."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, loop: Any) -> None:
        state = {f"model.{k}": v.clone() for k, v in loop.model.state_dict().items()}
        for i, group in enumerate(loop.optimizer.state.values()):
            state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in group.items()})
        self.states[loop.state.global_step] = state


def _batch_norm_net() -> nn.Module:
    torch.manual_seed(0)  # no dropout: the skipped forward pass draws no random numbers
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skipped_step_leaves_parameters_buffers_and_optimizer_as_they_were(
    precision, quiet_config, tmp_path
):
    x, y = make_classification(n=64).tensors
    x = x.clone()
    x[21, 3] = float("nan")  # one sample of batch 3 (batch size 8): its loss is NaN
    data = torch.utils.data.TensorDataset(x, y)
    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(tmp_path)},
        num_epochs=1,
        batch_size=8,
        optimizer_type="adamw",
        skip_nonfinite_steps=1,
        precision=precision,
        mixed_precision=precision != "fp32",
    )
    model = _batch_norm_net()
    snapshot = Snapshot()
    result = TrainingManager(config).train(model, DataLoader(data, 8), callbacks=[snapshot])
    assert result["global_step"] == 7  # 8 batches, one skipped
    # batch 3 was skipped: from there the run is the run without batch 3
    straight = _batch_norm_net()
    reference = plain_sgd_config(
        {**quiet_config, "output_dir": str(tmp_path / "ref")},
        num_epochs=1,
        batch_size=8,
        optimizer_type="adamw",
        precision=precision,
        mixed_precision=precision != "fp32",
    )
    kept = [i for i in range(64) if not 16 <= i < 24]  # batch 3 left out
    clean = torch.utils.data.TensorDataset(x[kept], y[kept])
    other = Snapshot()
    TrainingManager(reference).train(straight, DataLoader(clean, 8), callbacks=[other])
    for step in (2, 3, 7):
        mine, theirs = snapshot.states[step], other.states[step]
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), (step, key)
    saved = load_checkpoint_file(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_no_checkpoint_is_written_with_a_non_finite_buffer(quiet_config, tmp_path, sharding):
    from traineval.training.steplog import NonFiniteError

    class Poison(Callback):
        def on_step_end(self, loop: Any) -> None:
            if loop.state.global_step == 5:
                loop.model[1].running_var.fill_(float("nan"))

    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(tmp_path)},
        num_epochs=2,
        batch_size=8,
        checkpoint_every_n_steps=4,
        checkpoint_sharding=sharding,
    )
    train, _ = _classification()
    with pytest.raises(
        NonFiniteError,
        match=r"refusing to write last\.pt: the model's "
        r"'1\.running_var' holds NaN or infinite values; the previous last\.pt",
    ):
        TrainingManager(config).train(_mlp_with_batch_norm(), train, callbacks=[Poison()])
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.pt")["global_step"] == 4


class KeepBest(Callback):
    """The weights at each improvement of the monitored metric."""

    def on_epoch_end(self, loop: Any, logs: dict[str, Any]) -> None:
        if logs["improved"]:
            self.best = {k: v.clone() for k, v in loop.model.state_dict().items()}
            self.step = loop.state.global_step


def test_checkpoints_put_off_by_the_write_budget_hold_the_best_and_the_final_state(
    quiet_config, tmp_path, monkeypatch
):
    from traineval.runs import checkpoint
    from traineval.training import run_checkpoints
    from traineval.training.saves import Saves

    written: list[str] = []
    save = run_checkpoints.save_checkpoint_file

    def recorded(payload, path):
        written.append(path.name)
        return save(payload, path)

    monkeypatch.setattr(run_checkpoints, "save_checkpoint_file", recorded)  # written now
    monkeypatch.setattr(checkpoint, "save_checkpoint_file", recorded)  # put off, then written
    monkeypatch.setattr(Saves, "within_budget", lambda self: len(written) < 2)
    keep = KeepBest()
    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(tmp_path)},
        num_epochs=6,
        batch_size=8,
        optimizer_type="adamw",
        learning_rate=0.01,
        checkpoint_save_frequency=0,
        monitor_metric="train_loss",
    )
    train, val = _classification()
    model = _mlp_with_batch_norm()
    result = TrainingManager(config).train(model, train, val, callbacks=[keep])
    # epoch 1's best and last were written at once; after that each save was put off: the
    # best copied and written at the end, last written then from the final state
    assert written == ["best.pt", "last.pt", "best.pt", "last.pt"], written
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.pt")
    assert last["global_step"] == result["global_step"] == 48
    for key, value in model.state_dict().items():
        assert torch.equal(last["model"][key], value), key
    best = load_checkpoint_file(tmp_path / "checkpoints" / "best.pt")
    assert best["global_step"] == keep.step > 8
    for key, value in keep.best.items():
        assert torch.equal(best["model"][key], value), key


def test_the_write_budget_counts_copies_and_writes_and_still_writes_every_max_gap(monkeypatch):
    from traineval.runs import checkpoint_writer
    from traineval.runs.checkpoint_writer import WriteBudget

    now = [100.0]
    monkeypatch.setattr(checkpoint_writer.time, "perf_counter", lambda: now[0])
    budget = WriteBudget(0.1, max_gap=120.0)
    assert budget.allows()  # the first write
    with budget.charge(write=True):
        now[0] += 1.0  # a write of 1 s at 101 s
    now[0] += 18.0  # 19 s in, 1 s spent: another 1 s write would make 2 s of 19
    assert not budget.allows()
    now[0] += 1.0  # 20 s in: 2 s of 20 is the share
    assert budget.allows()
    with budget.charge(write=False):
        now[0] += 0.5  # a copy kept for later counts too ...
    assert budget.expected == 1.0  # ... but is not what the next write is expected to cost
    now[0] += 4.0  # 24.5 s in, 1.5 s spent: a write would make 2.5 s of 24.5
    assert not budget.allows()
    assert budget.spent == 1.5
    now[0] += 0.5
    assert budget.allows()
    with budget.charge(write=False):
        now[0] += 30.0  # copies alone beyond the share ...
    assert not budget.allows()
    now[0] = 101.0 + 120.0  # ... still a write every max_gap seconds after the last
    assert budget.allows()


class _AtEpochStart(Callback):
    """Asks for a stop, an interruption or sends SIGTERM in the `epoch`-th epoch's
    on_epoch_start (a callback that checks the time left before an epoch, say)."""

    def __init__(self, epoch: int, how: str) -> None:
        self.epoch, self.how = epoch, how

    def on_epoch_start(self, loop: Any) -> None:
        if loop.state.epoch != self.epoch:
            return
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.how == "interrupt":
            loop.request_interrupt("the test's interruption")
        else:
            loop.request_stop("the test's stop")


@pytest.mark.parametrize("how", ["sigterm", "interrupt", "stop"])
def test_a_stop_asked_at_an_epoch_s_start_resumes_to_that_epoch(how, quiet_config, tmp_path):
    """The epoch had been counted before its first batch: a resume took it for done and
    skipped it (a whole epoch lost; at the last epoch the run called itself finished), and a
    stop request there failed the run as "trained on no data"."""
    case = CASES["supervised"]
    straight, expected = _train(case, tmp_path / "straight", quiet_config)
    stop = [_AtEpochStart(2, how)]
    if how == "stop":
        _, stopped = _train(case, tmp_path / "stopped", quiet_config, callbacks=stop)
        assert stopped["status"] == "stopped early"
        assert stopped["training_history"]["epoch"] == [1]
    else:
        with pytest.raises(TrainingInterrupted):
            _train(case, tmp_path / "stopped", quiet_config, callbacks=stop)
    saved = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "last.pt")["loop"]
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0)
    resumed, result = _train(case, tmp_path / "stopped", quiet_config, resume_from="auto")
    assert result["training_history"]["epoch"] == expected["training_history"]["epoch"]
    assert result["stop_reason"] is None
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")


def test_a_run_early_stopping_ended_is_finished_unless_its_patience_is_raised(
    quiet_config, tmp_path, caplog
):
    """Its last.pt was written before the stop was recorded: each resume with the same
    config trained one more epoch and stopped again. A larger patience continues it, to
    the run that had that patience from the start; so does a stop_when no longer met."""
    case = CASES["supervised"]
    never_better = {"num_epochs": 6, "early_stopping_min_delta": 1e9}
    run = tmp_path / "run"
    _, stopped = _train(case, run, quiet_config, early_stopping_patience=2, **never_better)
    assert stopped["status"] == "stopped early"
    with caplog.at_level(logging.WARNING):
        _, result = _train(
            case, run, quiet_config, early_stopping_patience=2, resume_from="auto", **never_better
        )
    assert "already finished" in caplog.text
    assert "raise early_stopping_patience to train it further" in caplog.text
    assert result["global_step"] == stopped["global_step"]
    assert result["status"] == "stopped early"
    straight, expected = _train(
        case, tmp_path / "straight", quiet_config, early_stopping_patience=4, **never_better
    )
    longer, result = _train(
        case, run, quiet_config, early_stopping_patience=4, resume_from="auto", **never_better
    )
    assert result["global_step"] == expected["global_step"] > stopped["global_step"]
    assert result["stop_reason"] == expected["stop_reason"]
    assert_same_state(straight, longer, tmp_path / "straight", run)


class _SignalInEvaluationAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
        if loop.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_in_the_closing_evaluation_of_a_max_steps_stop_keeps_the_resume_point(
    quiet_config, tmp_path
):
    """last.pt holds the run before the closing evaluation of a max_steps stop; a SIGTERM in
    that evaluation rewrote it after, and the resumed run took in an evaluation the
    uninterrupted run never made (its plateau schedule halved the rate there)."""
    case = CASES["supervised"]
    settings = {"eval_frequency": 2, "scheduler_type": "plateau", "lr_scheduler_patience": 0}
    straight, expected = _train(case, tmp_path / "straight", quiet_config, **settings)
    with pytest.raises(TrainingInterrupted):
        _train(
            case,
            tmp_path / "stopped",
            quiet_config,
            max_steps=case.stop_at,
            callbacks=[_SignalInEvaluationAt(case.stop_at)],
            **settings,
        )
    saved = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "last.pt")["loop"]
    assert saved["last_eval_step"] < case.stop_at
    resumed, result = _train(
        case, tmp_path / "stopped", quiet_config, resume_from="auto", **settings
    )
    history, reference = result["training_history"], expected["training_history"]
    assert history["val_steps"] == reference["val_steps"]
    assert history["learning_rate"] == reference["learning_rate"]
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")


GROUP_SIGNAL_RUN = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from traineval import Callback, TrainingConfig, TrainingManager
from traineval.training.loop import TrainingInterrupted

class Slow(Dataset):
    def __init__(self):
        self.data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    def __len__(self):
        return 64
    def __getitem__(self, i):
        time.sleep(0.002)
        return self.data[i]

class ToTheGroup(Callback):
    def on_step_end(self, loop):
        if loop.state.global_step == 3:
            os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: every process of the group
            time.sleep(0.5)  # the workers get it too

config = TrainingConfig(output_dir=sys.argv[1], progress_bar=False, tensorboard_logging=False)
loader = DataLoader(Slow(), batch_size=8, num_workers=2)
try:
    TrainingManager(config).train(torch.nn.Linear(8, 3), loader, callbacks=[ToTheGroup()])
except TrainingInterrupted:
    print("interrupted")
"""


def test_a_signal_to_the_process_group_is_said_once_not_by_every_worker(tmp_path):
    """Forked DataLoader workers inherit the run's signal handler: each said it had the
    signal and was stopping (three lines with two workers) while only the run stops them."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(GROUP_SIGNAL_RUN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group: the signal stays in it
    )
    assert done.stdout.strip() == "interrupted", done.stderr
    assert done.stderr.count("SIGINT received") == 1, done.stderr


class _StepClock(Callback):
    """Tells the staged metric below which update the run is at."""

    step = 0

    def on_step_end(self, loop: Any) -> None:
        _StepClock.step = loop.state.global_step


def _staged(truth: Any, predicted: Any) -> float:
    """A monitored metric (higher is better) at its best at update 10, where only a
    max_steps=10 stop's closing evaluation looks, and at its worst after it."""
    step = _StepClock.step
    return 1.0 if step == 10 else 0.5 if step < 10 else 0.0


def _run_with_staged_metric(folder: Any, quiet_config: dict[str, Any], **settings: Any) -> Any:
    from traineval.evaluation import metric
    from traineval.evaluation.model_evaluator import ModelEvaluator

    resume = settings.pop("resume_from", None)
    config = plain_sgd_config(
        {**quiet_config, "output_dir": str(folder)},
        num_epochs=3,
        batch_size=8,
        eval_frequency=4,
        monitor_metric="val_staged",
        **settings,
    )
    evaluator = ModelEvaluator(metrics={"staged": metric(_staged, higher_is_better=True)})
    train, val = _classification()
    return TrainingManager(config).train(
        _mlp_with_batch_norm(),
        train,
        val,
        evaluator=evaluator,
        callbacks=[_StepClock()],
        resume_from=resume,
    )


@pytest.mark.parametrize(
    ("writer", "sharding"),
    [("sync", "full"), ("async", "full"), ("sync", "sharded"), ("async", "sharded")],
)
def test_a_resumed_max_steps_stop_keeps_the_best_of_the_uninterrupted_run(
    writer, sharding, quiet_config, tmp_path
):
    """The closing evaluation of a max_steps stop may improve on the best and write
    best.pt; the resumed run never saw that evaluation (its monitor is the one saved
    before it), yet best.pt kept its weights where no later evaluation improved."""
    settings = {"async_checkpointing": writer == "async", "checkpoint_sharding": sharding}
    expected = _run_with_staged_metric(tmp_path / "straight", quiet_config, **settings)
    stopped = _run_with_staged_metric(tmp_path / "stopped", quiet_config, max_steps=10, **settings)
    assert stopped["best_step"] == 10  # the closing evaluation was the best so far
    result = _run_with_staged_metric(
        tmp_path / "stopped", quiet_config, resume_from="auto", **settings
    )
    assert result["best_step"] == expected["best_step"] == 4
    theirs = load_checkpoint_file(tmp_path / "straight" / "checkpoints" / "best.pt")
    ours = load_checkpoint_file(tmp_path / "stopped" / "checkpoints" / "best.pt")
    assert ours["global_step"] == theirs["global_step"] == 4
    reference, resumed = _mlp_with_batch_norm(), _mlp_with_batch_norm()
    load_model_weights(reference, tmp_path / "straight" / "checkpoints" / "best.pt")
    load_model_weights(resumed, tmp_path / "stopped" / "checkpoints" / "best.pt")
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "stopped" / "checkpoints" / "best.safetensors")
    reference = load_file(tmp_path / "straight" / "checkpoints" / "best.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in reference.items())
    left = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert not [name for name in left if "resume-point" in name]
    if sharding == "sharded":  # one folder a checkpoint, the one its file names
        assert [name for name in left if name.startswith("best.shards-")] == [ours["shards"]]


def test_a_signal_in_the_step_early_stopping_ends_the_run_keeps_its_closing_record(
    quiet_config, tmp_path
):
    """Early stopping fired at a validation inside an epoch and a SIGTERM arrived in that
    same validation: the run saved and exited before it recorded the partial epoch, so the
    resumed run (finished: its stop still holds) lacked the history entry, the epoch's
    on_epoch_end and its last.pt that the uninterrupted run has."""
    case = CASES["supervised"]
    settings = {"eval_frequency": 3, "early_stopping_patience": 1}
    settings["early_stopping_min_delta"] = 1e9  # the first evaluation only is "better"
    straight, expected = _train(case, tmp_path / "straight", quiet_config, **settings)
    assert (expected["status"], expected["global_step"]) == ("stopped early", 6)
    signal_at = [_SignalInEvaluationAt(6)]
    with pytest.raises(TrainingInterrupted):
        _train(case, tmp_path / "stopped", quiet_config, callbacks=signal_at, **settings)
    resumed, result = _train(
        case, tmp_path / "stopped", quiet_config, resume_from="auto", **settings
    )
    assert result["status"] == "stopped early"
    assert result["training_history"] == expected["training_history"]
    assert result["stop_reason"] == expected["stop_reason"]
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "stopped")
    # its log too: the closing `best` record, which the signal came before, is logged once
    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")
    _train(case, tmp_path / "stopped", quiet_config, resume_from="auto", **settings)
    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")


def _fake_best(folder: Any, token: str) -> None:
    """best.pt naming a shard folder best.shards-<token> (a stand-in for a sharded save)."""
    shards = folder / f"best.shards-{token}"
    shards.mkdir()
    (shards / ".metadata").write_bytes(b"metadata")
    (folder / "best.pt").unlink(missing_ok=True)
    torch.save({"format": "traineval-checkpoint", "shards": shards.name}, folder / "best.pt")


def test_a_kill_inside_keeping_or_putting_back_the_best_loses_neither_best(tmp_path):
    """A kill after put_back_best renamed the kept shard folder back, before best.pt was
    replaced: the next start's sweep deleted that folder as named by no file, and the
    put-back then installed a best.pt naming it. A kill between keep_best_at_resume_point's
    two links left a lone best.at-resume-point.safetensors that failed the next keep."""
    import shutil

    from traineval.runs.checkpoint import remove_stale_temporaries
    from traineval.training.run_checkpoints import keep_best_at_resume_point, put_back_best

    _fake_best(tmp_path, "aaaa1111")
    keep_best_at_resume_point(tmp_path / "best.pt", None, shards=True)
    shutil.rmtree(tmp_path / "best.shards-aaaa1111")  # the closing evaluation's new best
    _fake_best(tmp_path, "bbbb2222")
    os.rename(  # put_back_best's first step, then the kill
        tmp_path / "best.at-resume-point.shards-aaaa1111", tmp_path / "best.shards-aaaa1111"
    )
    assert remove_stale_temporaries(tmp_path) == []  # the next start's sweep spares it
    put_back_best(tmp_path)
    assert torch.load(tmp_path / "best.pt")["shards"] == "best.shards-aaaa1111"
    assert (tmp_path / "best.shards-aaaa1111" / ".metadata").exists()
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == ["best.shards-bbbb2222"]
    (tmp_path / "best.safetensors").write_bytes(b"weights")
    os.link(tmp_path / "best.safetensors", tmp_path / "best.at-resume-point.safetensors")
    keep_best_at_resume_point(tmp_path / "best.pt", None, shards=True)  # (it raised)
    assert (tmp_path / "best.at-resume-point.pt").exists()
    (tmp_path / "best.at-resume-point.pt").unlink()  # a kill before the .pt's link ...
    put_back_best(tmp_path)  # ... leaves nothing kept: the lone links go
    assert not list(tmp_path.glob("best.at-resume-point*"))


def test_a_resumed_run_whose_part_does_not_improve_still_lists_its_best(quiet_config, tmp_path):
    """summary.json's checkpoints listed only what the resumed part saved: after a resume
    that did not improve, 'best' was gone (best.pt on disk, the test scored it), and a
    script reading summary['checkpoints']['best'] failed. Reference: the uninterrupted run."""
    from conftest import make_classification, make_mlp, plain_sgd_config

    train = DataLoader(make_classification(n=64, seed=1), batch_size=16)
    val = DataLoader(make_classification(n=32, seed=2), batch_size=16)

    def run(folder, **settings):
        # float32 weights do not move by 1e-30 steps: the loss never improves on epoch 1
        config = plain_sgd_config(
            quiet_config, num_epochs=3, learning_rate=1e-30, output_dir=str(tmp_path / folder),
            **settings,
        )  # fmt: skip
        TrainingManager(config).train(make_mlp(), train, val, resume_from="auto")
        return json.loads((tmp_path / folder / "summary.json").read_text())["checkpoints"]

    straight = run("straight")
    run("resumed", max_steps=6)
    resumed = run("resumed")
    assert set(resumed) == set(straight) >= {"best", "last"}
    assert resumed["best"].endswith("best.pt")
