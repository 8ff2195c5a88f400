"""A user's own training mode (prototypical networks) trains like a built-in one."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.cli import main
from traineval.data import Episodes
from traineval.loggers import read_jsonl
from traineval.modes import Mode, ModePlan, StepOutput, register
from traineval.training.exit_codes import exit_status_of
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, plain_sgd_config

# -- the user's code: a Mode of about 40 lines -------------------------------------------------


def proto_logits(model, support_x, support_y, query_x, ways):
    """Each query's negative squared distance to each class's mean support embedding."""
    n = support_x.shape[0] * support_x.shape[1]  # one forward pass (DDP wants one)
    embedded = model(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
    support = embedded[:n].unflatten(0, support_x.shape[:2])
    query = embedded[n:].unflatten(0, query_x.shape[:2])
    one_hot = F.one_hot(support_y, ways).float()  # (tasks, support, ways)
    prototypes = one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)
    return -(torch.cdist(query, prototypes) ** 2)  # (tasks, queries, ways)


class ProtoStep:
    def __init__(self, ways: int):
        self.ways = ways

    def weight(self, batch):  # tasks weigh equally
        return int(batch[0].shape[0])

    def __call__(self, model, batch):
        support_x, support_y, query_x, query_y = batch
        logits = proto_logits(model, support_x, support_y, query_x, self.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten())
        tasks = int(support_x.shape[0])
        return StepOutput(loss=loss, weight=tasks, num_samples=tasks)


@dataclasses.dataclass(frozen=True)
class ProtoNet(Mode):
    """Prototypical networks (Snell et al., 2017) over batches of few-shot tasks."""

    name: ClassVar[str] = "protonet_test"
    ways: int = 3

    def plan(self, ctx):
        step = ProtoStep(self.ways)

        def evaluate(model):
            losses, correct, total = [], 0, 0
            with torch.no_grad():
                for sx, sy, qx, qy in ctx.val_loader:
                    logits = proto_logits(model, sx, sy, qx, self.ways)
                    losses.append(F.cross_entropy(logits.flatten(0, 1), qy.flatten()))
                    correct += int((logits.argmax(-1) == qy).sum())
                    total += qy.numel()
            return {"loss": float(torch.stack(losses).mean()), "accuracy": correct / total}

        return ModePlan(step, evaluate=evaluate if ctx.val_loader is not None else None)


# -- the tests ---------------------------------------------------------------------------------


def _tasks(count, seed):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 5, generator=generator) * 2
    y = torch.arange(6).repeat_interleave(10)
    data = TensorDataset(centers[y] + torch.randn(len(y), 5, generator=generator), y)
    episodes = Episodes(data, ways=3, shots=2, queries=4, episodes=count, seed=seed)
    return DataLoader(episodes, batch_size=4, shuffle=False)


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8))


def test_a_users_mode_equals_a_hand_written_protonet_loop(quiet_config):
    config = plain_sgd_config(quiet_config, num_epochs=3, learning_rate=0.05)
    model = _encoder()
    result = TrainingManager(config).train(model, _tasks(12, seed=0), mode=ProtoNet(ways=3))

    reference = _encoder()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        epoch = []
        for sx, sy, qx, qy in _tasks(12, seed=0):
            logits = proto_logits(reference, sx, sy, qx, 3)
            loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch.append(loss.item())
        losses.append(sum(epoch) / len(epoch))
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert result["training_history"]["train_loss"] == pytest.approx(losses, abs=1e-6)


def test_a_users_mode_keeps_the_best_checkpoint_and_resumes_exactly(quiet_config, tmp_path):
    def run(folder, callbacks=(), resume=None):
        settings = {**quiet_config, "output_dir": str(tmp_path / folder)}
        config = TrainingConfig(**settings, num_epochs=4, learning_rate=0.01, seed=3)
        model = _encoder()
        result = TrainingManager(config).train(
            model,
            _tasks(12, seed=0),
            _tasks(4, seed=1),
            mode=ProtoNet(ways=3),
            callbacks=callbacks,
            resume_from=resume,
        )
        return model, result

    straight, result = run("straight")
    assert result.monitor_metric == "val_loss"
    assert (tmp_path / "straight" / "checkpoints" / "best.pt").exists()
    events = read_jsonl(tmp_path / "straight" / "metrics.jsonl")  # the loggers' record
    assert [e["epoch"] for e in events if e["event"] == "eval"] == [1, 2, 3, 4]
    assert all("val_accuracy" in e for e in events if e["event"] == "eval")
    assert main(["report", str(tmp_path / "straight")]) == 0
    assert (tmp_path / "straight" / "report.html").exists()
    assert result["training_history"]["val_metrics"][-1]["accuracy"] > 0.6  # 3-way: chance 1/3
    with pytest.raises(TrainingInterrupted):
        run("resumed", callbacks=[InterruptAt(step=5)])  # in the middle of epoch 2
    resumed, again = run("resumed", resume="auto")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again["training_history"]["train_loss"] == result["training_history"]["train_loss"]
    assert again.best_metric == result.best_metric


def test_a_registered_mode_is_named_by_train_and_by_the_config(quiet_config):
    register(ProtoNet, replace=True)
    config = plain_sgd_config(quiet_config, num_epochs=1, learning_rate=0.05)
    by_name = _encoder()
    TrainingManager(config).train(by_name, _tasks(8, seed=0), mode="protonet_test")
    settings = {"protonet_test": {"ways": 3}}
    by_settings = _encoder()
    configured = plain_sgd_config(quiet_config, num_epochs=1, learning_rate=0.05)
    configured = TrainingConfig(**{**configured.to_dict(), "mode_settings": settings})
    TrainingManager(configured).train(by_settings, _tasks(8, seed=0), mode="protonet_test")
    for a, b in zip(by_name.parameters(), by_settings.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"mode\.shots=2 is invalid: mode .protonet_test. has"):
        TrainingConfig(mode_settings={"protonet_test": {"shots": 2}})
    with pytest.raises(ValueError, match=r"mode=.protonet_tset. is invalid.*did you mean"):
        TrainingManager(config).train(_encoder(), _tasks(8, seed=0), mode="protonet_tset")


class _Returning:
    """A user's step returning `what(loss)`, with no `weight(batch)`."""

    def __init__(self, what):
        self.what = what

    def __call__(self, model, batch):
        x, y = batch
        return self.what(F.cross_entropy(model(x), y))


@pytest.mark.parametrize(
    ("what", "said"),
    [
        (lambda loss: loss, r"the step _Returning returned Tensor; it must return StepOutput"),
        (lambda loss: (loss, 8), r"the step _Returning returned tuple; it must return StepOut"),
        (
            lambda loss: StepOutput(loss=loss.item(), weight=8, num_samples=8),
            r"returned StepOutput\(loss=[0-9.]+\); the loss must be a tensor",
        ),
        (  # was torch's "element 0 of tensors does not require grad", naming no step
            lambda loss: StepOutput(loss=loss.detach(), weight=8, num_samples=8),
            r"the step _Returning returned a loss that does not require grad \(detached",
        ),
        (
            lambda loss: StepOutput(loss=loss.expand(3), weight=8, num_samples=8),
            r"the step _Returning returned a loss of shape \(3,\); the loss must be a scalar",
        ),
    ],
    ids=["tensor", "tuple", "float-loss", "detached", "vector"],
)
def test_a_step_that_breaks_the_contract_is_named(what, said, tmp_path):
    """It was an AttributeError from inside the loop ('Tensor' object has no attribute
    'loss')."""
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Broken(Mode):
        name: ClassVar[str] = "broken_contract_test"

        def plan(self, ctx):
            return ModePlan(_Returning(what))

    config = TrainingConfig(
        num_epochs=1, output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False
    )
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), 8)
    with pytest.raises(TypeError, match=said) as raised:
        TrainingManager(config).train(torch.nn.Linear(4, 2), data, mode=Broken())
    assert exit_status_of(raised.value) == 2  # the step must change: bad input, not a fault
    accumulating = TrainingConfig(
        num_epochs=1, output_dir=str(tmp_path / "acc"), gradient_accumulation_steps=2,
        progress_bar=False, tensorboard_logging=False,
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"the step _Returning has no weight\(batch\) method"):
        TrainingManager(accumulating).train(torch.nn.Linear(4, 2), data, mode=Broken())
    assert not (tmp_path / "acc" / "checkpoints").exists()  # refused before training


@dataclasses.dataclass(frozen=True)
class _Scaled(Mode):
    name: ClassVar[str] = "scaled_resume_test"
    scale: float = 1.0

    def plan(self, ctx):
        step = _Returning(lambda loss: StepOutput(loss=loss * self.scale, weight=8, num_samples=8))
        return ModePlan(step)


def test_a_changed_mode_setting_on_resume_is_said(tmp_path, caplog):
    """The docs say a mode's settings are compared when a run resumes; only the ones it
    fixes were: any other changed silently."""
    import logging

    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), 8)
    config = TrainingConfig(
        num_epochs=2, max_steps=3, output_dir=str(tmp_path), progress_bar=False,
        tensorboard_logging=False,
    )  # fmt: skip
    TrainingManager(config).train(torch.nn.Linear(4, 2), data, mode=_Scaled())
    longer = dataclasses.replace(config, max_steps=None)
    with caplog.at_level(logging.WARNING):
        TrainingManager(longer).train(
            torch.nn.Linear(4, 2), data, mode=_Scaled(scale=7.5), resume_from="auto"
        )
    assert "scaled_resume_test.scale: checkpoint 1.0, now 7.5" in caplog.text


class CurriculumStep:
    """Label smoothing that decays with the updates the step has made: state of its own."""

    def __init__(self) -> None:
        self.calls = 0

    def weight(self, batch):
        return int(batch[0].shape[0])

    def __call__(self, model, batch):
        x, y = batch
        self.calls += 1
        smoothing = max(0.0, 0.5 * (1 - self.calls / 20))
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        return StepOutput(loss=loss, weight=len(y), num_samples=len(y))


class SavedCurriculumStep(CurriculumStep):
    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@dataclasses.dataclass(frozen=True)
class Curriculum(Mode):
    name: ClassVar[str] = "curriculum"
    saves_its_step: bool = False

    def plan(self, ctx):
        return ModePlan(SavedCurriculumStep() if self.saves_its_step else CurriculumStep())


@pytest.mark.parametrize("saved", [False, True])
def test_a_step_with_state_of_its_own_resumes_exactly_with_state_dict_and_is_warned_without(
    quiet_config, tmp_path, caplog, saved
):
    """docs/modes-your-own.md: a step's counters resume only through its state_dict(); one
    without it resumed silently to other weights (the resume restarted its count)."""
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def run(folder, **more):
        torch.manual_seed(0)
        model = nn.Linear(8, 2)
        settings = {**quiet_config, "output_dir": str(tmp_path / folder), "warmup_steps": 0}
        config = TrainingConfig(**settings, num_epochs=3)
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        TrainingManager(config).train(model, loader, mode=Curriculum(saved), **more)
        return model

    with caplog.at_level("WARNING"):
        straight = run("straight")
    said = "CurriculumStep's calls changed during training, and CurriculumStep has no state_dict"
    assert (said in caplog.text) is not saved
    with pytest.raises(TrainingInterrupted):
        run("resumed", callbacks=[InterruptAt(step=5)])
    resumed = run("resumed", resume_from="auto")
    same = torch.equal(straight.weight, resumed.weight)
    assert same is saved  # without state_dict(): the warned difference


def test_the_step_watch_compares_any_attribute_without_failing_and_skips_parameters(caplog):
    """A number that became a tensor of four raised 'Boolean value of Tensor ... ambiguous'
    inside the checkpoint's save; a parameter the step trains is the checkpoint's own."""
    from traineval.training.step_state import StepWatch

    class Step:
        def __init__(self):
            self.ema = 0.0
            self.weight = nn.Parameter(torch.ones(2))

    step = Step()
    watch = StepWatch(step)
    with torch.no_grad():
        step.weight.add_(1.0)
    watch.check()
    assert not watch.said  # the parameter changed: not the step's own state
    step.ema = 0.9 * step.ema + 0.1 * torch.ones(4)
    with caplog.at_level("WARNING"):
        watch.check()
    assert "Step's ema changed during training" in caplog.text


def test_an_unknown_mode_setting_gets_a_did_you_mean():
    from traineval.modes import Federated

    with pytest.raises(
        ValueError, match=r"mode\.client=4 is invalid: .*\(did you mean 'clients'\?\)"
    ):
        Federated.from_settings({"client": 4})
