"""A user's mode, in the user's own package, named in a config file by import path: it
trains with `traineval fit`, resumes exactly, runs `cv` and `tune`, and a run directory that
names it is untrusted input like any other that names code."""

from __future__ import annotations

import textwrap

import pytest
import torch

from traineval.cli import main
from traineval.config import load_yaml
from traineval.runs.checkpoint import load_checkpoint_file

KD = '''
"""Knowledge distillation from a fixed teacher (a random projection of the inputs, drawn
from `teacher_seed`): built from the mode's settings, never pickled into a checkpoint."""
import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from traineval.modes import Mode, ModePlan, StepOutput, resource


class KDStep:
    def __init__(self, temperature, alpha, teacher_seed):
        self.t, self.alpha, self.seed, self.teacher = temperature, alpha, teacher_seed, None

    def __call__(self, model, batch):
        x, y = batch
        logits = model(x)
        if self.teacher is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.teacher = torch.randn(x.shape[1], logits.shape[1], generator=generator)
        soft = F.softmax(x @ self.teacher.to(x.device) / self.t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / self.t, dim=1), soft, reduction="batchmean")
        loss = (1 - self.alpha) * F.cross_entropy(logits, y) + self.alpha * kd * self.t**2
        return StepOutput(loss=loss, weight=len(y), num_samples=len(y), outputs=logits,
                          targets=y)


@dataclasses.dataclass(frozen=True)
class Distillation(Mode):
    name: ClassVar[str] = "distillation"
    temperature: float = 2.0
    alpha: float = 0.5
    teacher_seed: int = 0

    def plan(self, ctx):
        return ModePlan(KDStep(self.temperature, self.alpha, self.teacher_seed))


@dataclasses.dataclass(frozen=True)
class FirstRows(Distillation):
    """Prepares its own data: trains on the first `rows` training rows only."""

    name: ClassVar[str] = "first_rows"
    rows: int = 40

    def prepare(self, splits, data):
        splits = super().prepare(splits, data)
        splits.train = torch.utils.data.Subset(splits.train, range(self.rows))
        return splits


@dataclasses.dataclass(frozen=True)
class NeedsTeacher(Distillation):
    """Needs an object only Python code can give."""

    name: ClassVar[str] = "needs_teacher"
    teacher: object = resource()
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The user's folder: their package `kdpkg` beside a config that names its mode."""
    import sys

    from traineval.modes import contract

    for name in [m for m in sys.modules if m == "kdpkg" or m.startswith("kdpkg.")]:
        monkeypatch.delitem(sys.modules, name)  # each test imports its own copy
    monkeypatch.setattr(contract, "_OFFERED", set())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kdpkg").mkdir()
    (tmp_path / "kdpkg" / "__init__.py").write_text("")
    (tmp_path / "kdpkg" / "kd.py").write_text(KD)
    config = tmp_path / "kd.yaml"
    config.write_text(
        textwrap.dedent("""\
        data: {name: iris}
        model: {name: mlp, options: {hidden_sizes: [16]}}
        mode: {name: "kdpkg.kd:Distillation", temperature: 4.0}
        training: {num_epochs: 4, batch_size: 16, learning_rate: 0.01, warmup_steps: 0,
                   scheduler_type: constant, seed: 3, progress_bar: false,
                   tensorboard_logging: false}
        """)
    )
    return tmp_path, config


def _weights(run):
    return load_checkpoint_file(run / "checkpoints" / "last.pt")["model"]


def test_a_users_mode_named_by_import_path_trains_and_resumes_exactly(project):
    folder, config = project
    straight, resumed = folder / "straight", folder / "resumed"
    assert main(["fit", str(config), "-q", f"training.output_dir={straight}"]) == 0
    recorded = load_yaml(straight / "config.yaml")["mode"]
    assert recorded == {"name": "kdpkg.kd:Distillation", "temperature": 4.0, "alpha": 0.5,
                        "teacher_seed": 0}  # fmt: skip
    first = [str(config), "-q", f"training.output_dir={resumed}"]
    assert main(["fit", *first, "training.max_steps=10"]) == 0  # 7 updates an epoch: epoch 2
    assert main(["fit", *first, "--resume", "auto"]) == 0
    a, b = _weights(straight), _weights(resumed)
    steps = [
        load_checkpoint_file(r / "checkpoints" / "last.pt")["global_step"]
        for r in (straight, resumed)
    ]
    assert steps == [28, 28]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the run directory names code: evaluated only when the user says they trust it
    assert main(["evaluate", str(straight)]) == 2
    assert main(["evaluate", str(straight), "--trust-code"]) == 0
    assert main(["report", str(straight)]) == 0  # reads files only: imports nothing


def test_a_users_mode_named_by_import_path_runs_cross_validation(project, capsys):
    folder, config = project
    out = folder / "cv"
    assert main(["cv", str(config), "--folds", "3", "-q", f"training.output_dir={out}",
                 "training.num_epochs=2"]) == 0  # fmt: skip
    configs = sorted(out.glob("fold-*/config.yaml"))
    assert len(configs) == 3
    assert {load_yaml(c)["mode"]["name"] for c in configs} == {"kdpkg.kd:Distillation"}


def test_a_users_mode_named_by_import_path_is_tuned(project):
    pytest.importorskip("optuna")
    folder, config = project
    study, searched = folder / "study", folder / "search.yaml"
    searched.write_text(config.read_text() + "search: {learning_rate: {low: 0.001, high: 0.1}}\n")
    argv = ["tune", str(searched), "--trials", "4", "-q", f"training.output_dir={study}",
            "training.num_epochs=2"]  # fmt: skip
    assert main(argv) == 0
    trials = sorted(study.glob("trial-*/config.yaml"))
    assert len(trials) == 4
    assert {load_yaml(t)["mode"]["name"] for t in trials} == {"kdpkg.kd:Distillation"}
    best = load_yaml(study / "best_config.yaml")
    assert best["mode"]["name"] == "kdpkg.kd:Distillation"


def test_an_import_path_that_is_not_a_mode_is_refused_naming_it(project, capsys):
    folder, config = project
    text = config.read_text().replace("kdpkg.kd:Distillation", "kdpkg.kd:KDStep")
    config.write_text(text)
    assert main(["fit", str(config), "-q", f"training.output_dir={folder / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "mode.name='kdpkg.kd:KDStep' is invalid: expected a traineval Mode subclass" in err


def test_a_users_mode_offered_by_an_entry_point_is_named_by_its_name(project, monkeypatch):
    """An installed package offers the mode in the `traineval.modes` entry-point group."""
    from traineval.config import registry

    folder, config = project
    info = folder / "kdpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdpkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[traineval.modes]\ndistillation = kdpkg.kd:Distillation\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(registry, "_MODES", dict(registry._MODES))  # forget it afterwards
    config.write_text(config.read_text().replace('"kdpkg.kd:Distillation"', "distillation"))
    run = folder / "by-name"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    assert load_yaml(run / "config.yaml")["mode"]["name"] == "distillation"
    registry._MODES.pop("distillation")  # as a new process: found through the entry point
    assert main(["evaluate", str(run)]) == 2  # installed code, still under the trust rule
    assert main(["evaluate", str(run), "--trust-code"]) == 0


def test_a_users_mode_prepares_its_own_data_for_fit(project):
    folder, config = project
    config.write_text(config.read_text().replace("kd:Distillation", "kd:FirstRows"))
    run = folder / "first-rows"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}", "mode.rows=40"]) == 0
    last = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 4 * 3  # 40 rows in batches of 16: 3 updates an epoch
    assert load_yaml(run / "config.yaml")["mode"]["rows"] == 40


def test_a_registered_users_mode_is_recorded_by_its_import_path(project, monkeypatch):
    """`register` makes a name known in this process only: a run records the import path,
    which a later process can import (entry-point modes and traineval's keep their name)."""
    from traineval.config import registry
    from traineval.modes import Federated, mode_class, mode_reference, register

    monkeypatch.setattr(registry, "_MODES", dict(registry._MODES))
    monkeypatch.syspath_prepend(str(project[0]))
    cls = register(mode_class("kdpkg.kd:Distillation"))
    assert mode_reference(cls) == "kdpkg.kd:Distillation"
    assert mode_reference(Federated) == "federated"


def test_a_run_of_a_users_classifier_mode_predicts_rows(project, capsys):
    """predict took a fixed list of modes: a user's classifier mode was refused, though
    evaluate scored the same run."""
    import csv

    from sklearn.datasets import load_iris

    folder, config = project
    run = folder / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    iris = load_iris()
    rows = folder / "rows.csv"
    with rows.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(iris.feature_names)
        writer.writerows(iris.data[:5].tolist())
    out = folder / "scored.csv"
    code = main(["predict", str(run), str(rows), "--output", str(out), "--trust-code"])
    assert code == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction,prob_setosa,prob_versicolor,prob_virginica"
    assert len(lines) == 6


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        (
            "teacher_seed: abc",
            "mode.teacher_seed='abc' is invalid: mode 'distillation' declares it int",
        ),
        (
            "teacher_seed: true",
            "mode.teacher_seed=True is invalid: mode 'distillation' declares it int",
        ),
        ("alpha: half", "mode.alpha='half' is invalid: mode 'distillation' declares it float"),
    ],
)
def test_a_users_setting_of_the_wrong_type_is_refused_before_training(
    project, capsys, setting, said
):
    """Settings annotated int, float, bool or str are checked when a config file gives
    them (a string where the mode computed with a number failed midway, exit 1)."""
    folder, config = project
    config.write_text(config.read_text().replace("temperature: 4.0", setting))
    assert main(["fit", str(config), "-q", f"training.output_dir={folder / 'x'}"]) == 2
    assert said in capsys.readouterr().err
    assert not (folder / "x").exists()


def test_a_float_setting_takes_an_integer(project):
    folder, config = project
    config.write_text(config.read_text().replace("temperature: 4.0", "temperature: 4"))
    assert main(["fit", str(config), "-q", f"training.output_dir={folder / 'x'}",
                 "training.max_steps=2"]) == 0  # fmt: skip


def test_a_resource_a_config_file_cannot_give_is_refused_naming_it(project, capsys):
    folder, config = project
    config.write_text(config.read_text().replace(
        '{name: "kdpkg.kd:Distillation", temperature: 4.0}', '"kdpkg.kd:NeedsTeacher"'
    ))  # fmt: skip
    assert main(["fit", str(config), "-q", f"training.output_dir={folder / 'x'}"]) == 2
    assert "needs its resource 'teacher', which a config file cannot give" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("field", ["saved", "settings", "check", "score", "fold", "key"])
def test_a_setting_named_like_the_contract_is_refused_where_the_mode_is_defined(field):
    """A setting `saved` trained, then its resume called the setting's value: a bare
    TypeError ('int' object is not callable)."""
    import dataclasses
    from typing import ClassVar

    from traineval.modes import Mode

    with pytest.raises(TypeError, match=rf"a mode's setting cannot be named '{field}'"):
        dataclasses.make_dataclass(
            "Clash", [(field, int, 1)], bases=(Mode,), frozen=True,
            namespace={"name": "clash", "__annotations__": {"name": ClassVar[str]}},
        )  # fmt: skip
