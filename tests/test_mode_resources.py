"""A Mode's objects that are not settings (a teacher model, an environment factory) are
`resource()` fields: given to the constructor, never written to a checkpoint or config.yaml,
never compared on resume; the run's config.yaml records the mode and its settings."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager
from traineval.modes import Mode, ModePlan, StepOutput, resource
from traineval.runs.checkpoint import load_checkpoint_file
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt
from test_resume import assert_same_state

# -- the user's code: distillation from a trained teacher --------------------------------------


class DistillStep:
    def __init__(self, teacher: nn.Module, temperature: float):
        self.teacher, self.temperature = teacher, temperature

    def weight(self, batch):
        return int(batch[0].shape[0])

    def __call__(self, model, batch):
        x, _ = batch
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / self.temperature, dim=-1)
        student = F.log_softmax(model(x) / self.temperature, dim=-1)
        loss = F.kl_div(student, soft, reduction="batchmean") * self.temperature**2
        return StepOutput(loss=loss, weight=int(x.shape[0]), num_samples=int(x.shape[0]))


@dataclasses.dataclass(frozen=True)
class Distill(Mode):
    """Train the model to match a teacher's softened outputs."""

    name: ClassVar[str] = "distill_test"
    temperature: float = 2.0
    teacher: nn.Module | None = resource()

    def plan(self, ctx):
        if self.teacher is None:
            raise ValueError("mode 'distill_test' needs teacher=<a trained model>")
        return ModePlan(DistillStep(self.teacher.to(ctx.device).eval(), self.temperature))


def _teacher():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))


def _student():
    torch.manual_seed(1)
    return nn.Linear(6, 3)


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    return DataLoader(TensorDataset(x, torch.zeros(96, dtype=torch.long)), batch_size=16)


# -- the tests ---------------------------------------------------------------------------------


def test_a_teacher_is_never_saved_and_a_resume_with_it_again_is_exact(quiet_config, tmp_path):
    def run(folder, callbacks=(), resume=None):
        settings = {**quiet_config, "output_dir": str(tmp_path / folder)}
        config = TrainingConfig(
            **settings, num_epochs=3, learning_rate=0.01, checkpoint_every_n_steps=2
        )
        model = _student()
        TrainingManager(config).train(model, _data(), mode=Distill(teacher=_teacher()),
                                      callbacks=callbacks, resume_from=resume)  # fmt: skip
        return model

    straight = run("straight")
    with pytest.raises(TrainingInterrupted):
        run("resumed", callbacks=[InterruptAt(step=9)])  # in the middle of epoch 2
    payload = load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.pt")
    # not registered: recorded by its import path, which a later process can import
    recorded = {"name": "test_mode_resources:Distill", "temperature": 2.0}
    assert payload["mode"] == recorded  # no teacher
    resumed = run("resumed", resume="auto")
    assert_same_state(straight, resumed, tmp_path / "straight", tmp_path / "resumed")
    written = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert written["mode"] == recorded
    assert written["training"]["num_epochs"] == 3


def test_a_resource_is_not_a_setting(quiet_config):
    with_teacher = Distill(teacher=_teacher())
    assert with_teacher.settings() == {"temperature": 2.0}
    assert with_teacher == Distill()  # compared by settings alone
    assert "teacher" not in repr(with_teacher)
    with pytest.raises(ValueError, match=r"mode\.teacher.*has the settings temperature"):
        Distill.from_settings({"teacher": "a model in a config file"})


def test_a_factory_builds_the_resource_where_a_config_names_the_mode():
    @dataclasses.dataclass(frozen=True)
    class Probe(Mode):
        name: ClassVar[str] = "probe_test"
        head: nn.Module = resource(default_factory=lambda: nn.Linear(4, 2))

    built = Probe.from_settings({})
    assert isinstance(built.head, nn.Linear)
    assert built.to_dict() == {"name": "probe_test"}


def test_a_resource_only_python_gives_is_refused_only_where_a_config_file_names_the_mode():
    """From Python the mode's settings may still travel in mode_settings beside a mode
    given the resource; the refusal belongs to config files."""
    from traineval.modes.contract import refuse_resources_without_factory

    @dataclasses.dataclass(frozen=True)
    class Needs(Mode):
        name: ClassVar[str] = "needs_test"
        temperature: float = 2.0
        teacher: nn.Module = resource()

    assert Needs.from_settings({"temperature": 3.0}).temperature == 3.0
    with pytest.raises(ValueError, match="needs its resource 'teacher'"):
        refuse_resources_without_factory(Needs)
    refuse_resources_without_factory(Distill)  # `teacher: nn.Module | None`: optional
