"""Cross-validation (fresh state per fold, best metrics) and ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from sklearn.model_selection import GroupKFold
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import EvaluationConfig, Evaluator, TrainingConfig
from traineval.assembly.cross_validation import make_folds

from conftest import make_classification


class SimpleModel(nn.Module):
    """SPEC.md's cross-validation example passes a class that takes no arguments."""

    instances = 0

    def __init__(self):
        super().__init__()
        SimpleModel.instances += 1
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _config(tmp_path, **overrides):
    settings = {
        "num_epochs": 4,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "scheduler_type": "constant",
        "early_stopping_patience": 0,
        "progress_bar": False,
        "tensorboard_logging": False,
        "device": "cpu",
        "output_dir": str(tmp_path / "cv"),
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def test_cross_validate_reports_each_folds_best_metrics(tmp_path):
    dataset = make_classification(n=150, seed=3)
    SimpleModel.instances = 0
    result = Evaluator().cross_validate(SimpleModel, dataset, _config(tmp_path), n_folds=3)
    assert SimpleModel.instances == 3  # fresh weights per fold
    folds = result["folds"]
    assert [f["validation_size"] for f in folds] == [50, 50, 50]
    for fold in folds:
        history = json.loads(
            (tmp_path / "cv" / f"fold-{fold['fold']}" / "summary.json").read_text()
        )
        assert history["best_epoch"] == fold["best_epoch"]
        assert (tmp_path / "cv" / f"fold-{fold['fold']}" / "checkpoints" / "best.pt").exists()
    losses = [f["best_metrics"]["loss"] for f in folds]
    assert result["loss_mean"] == pytest.approx(np.mean(losses))
    assert result["loss_std"] == pytest.approx(np.std(losses))
    assert {"accuracy_mean", "accuracy_std", "f1_mean"} <= set(result)
    assert (
        json.loads((tmp_path / "cv" / "cv_summary.json").read_text())["loss_mean"]
        == (result["loss_mean"])
    )


def test_best_not_last_metrics_are_reported(tmp_path):
    """With a learning rate that diverges late, the best epoch is not the last."""
    dataset = make_classification(n=120, seed=4)
    config = _config(
        tmp_path, num_epochs=6, learning_rate=0.5, optimizer_type="sgd", gradient_clipping=False
    )
    result = Evaluator().cross_validate(SimpleModel, dataset, config, n_folds=2)
    for fold in result["folds"]:
        history = json.loads(
            (tmp_path / "cv" / f"fold-{fold['fold']}" / "summary.json").read_text()
        )
        assert fold["best_metrics"]["loss"] == history["best_metric"]
    assert any(fold["best_epoch"] < 6 for fold in result["folds"])  # not the last epoch


def test_folds_are_stratified_grouped_or_plain():
    labels = np.array([0] * 30 + [1] * 10)
    for _, val in make_folds(40, 5, labels=labels, seed=0):
        assert np.bincount(labels[val]).tolist() == [6, 2]
    groups = np.repeat(np.arange(8), 5)
    for train, val in make_folds(40, 4, groups=groups):
        assert not set(groups[train]) & set(groups[val])
    # grouped folds follow the seed, as scikit-learn's shuffled GroupKFold makes them (they
    # were the same for every seed)
    by_seed = [
        [val.tolist() for _, val in make_folds(40, 4, groups=groups, seed=s)] for s in (0, 1)
    ]
    assert by_seed[0] != by_seed[1]
    reference = GroupKFold(n_splits=4, shuffle=True, random_state=1).split(groups, groups=groups)
    assert by_seed[1] == [val.tolist() for _, val in reference]
    plain = make_folds(40, 4, seed=1)
    assert sorted(np.concatenate([val for _, val in plain]).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="a class has only 10 samples"):
        make_folds(40, 11, labels=labels)
    with pytest.raises(ValueError, match=r"n_folds=1 \(--folds\) is invalid"):
        make_folds(40, 1)


def test_a_factory_function_works_too(tmp_path):
    dataset = make_classification(n=60)
    result = Evaluator().cross_validate(
        lambda: nn.Linear(8, 3), dataset, _config(tmp_path, num_epochs=1), n_folds=2
    )
    assert len(result["fold_checkpoints"]) == 2


def test_ensemble_averages_probabilities_and_reports_members(tmp_path):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(200, 8, generator=generator)
    y = torch.randint(0, 3, (200,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    members = [nn.Linear(8, 3) for _ in range(3)]
    result = Evaluator(
        EvaluationConfig(classification_metrics=["accuracy", "log_loss"])
    ).evaluate_ensemble(members, loader)
    with torch.no_grad():
        probabilities = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    assert result["ensemble"]["accuracy"] == pytest.approx(
        sk.accuracy_score(y, probabilities.argmax(1))
    )
    assert result["ensemble"]["log_loss"] == pytest.approx(
        sk.log_loss(y, probabilities.double() / probabilities.double().sum(1, keepdim=True)),
        rel=1e-6,
    )
    assert result["ensemble"]["loss"] == pytest.approx(result["ensemble"]["log_loss"], rel=1e-6)
    assert len(result["members"]) == 3


def test_ensemble_of_regressors_averages_predictions():
    x = torch.randn(40, 2)
    y = x.sum(1)
    members = [nn.Linear(2, 1) for _ in range(2)]
    result = Evaluator().evaluate_ensemble(members, DataLoader(TensorDataset(x, y), 8))
    with torch.no_grad():
        mean = torch.stack([m(x) for m in members]).mean(0).reshape(-1)
    assert result["ensemble"]["mse"] == pytest.approx(sk.mean_squared_error(y, mean), rel=1e-5)


def test_fold_checkpoints_evaluate_as_an_ensemble(tmp_path):
    dataset = make_classification(n=90)
    evaluator = Evaluator()
    cv = evaluator.cross_validate(SimpleModel, dataset, _config(tmp_path, num_epochs=2), 3)
    test = DataLoader(make_classification(n=60, seed=9), batch_size=32)
    result = evaluator.evaluate_ensemble(cv["fold_checkpoints"], test, model_factory=SimpleModel)
    assert 0.0 <= result["ensemble"]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="pass model_factory"):
        evaluator.evaluate_ensemble(cv["fold_checkpoints"], test)


def test_every_fold_starts_from_the_same_weights_whatever_the_global_random_state(tmp_path):
    dataset = make_classification(n=90, seed=3)
    initial = []

    def factory():
        model = SimpleModel()
        initial.append([p.detach().clone() for p in model.parameters()])
        return model

    summaries = []
    for run, global_seed in enumerate((123, 456)):
        torch.manual_seed(global_seed)  # the caller's state must not matter
        np.random.seed(global_seed)
        config = _config(tmp_path / str(run), num_epochs=2, seed=7)
        summaries.append(Evaluator().cross_validate(factory, dataset, config, n_folds=3))
    assert len(initial) == 6
    for weights in initial[1:]:
        assert all(torch.equal(a, b) for a, b in zip(initial[0], weights, strict=True))
    assert summaries[0]["folds"] == [
        {**fold, "checkpoint": fold["checkpoint"].replace(f"{tmp_path}/1", f"{tmp_path}/0"),
         "output_dir": fold["output_dir"].replace(f"{tmp_path}/1", f"{tmp_path}/0")}
        for fold in summaries[1]["folds"]
    ]  # fmt: skip


def test_an_earlier_cross_validation_is_refused_or_replaced_whole(tmp_path):
    """A second cross-validation into the same folder was told to resume (with a flag cv
    does not have); with overwrite, 2 folds after 3 left fold-3 of the earlier one."""
    dataset = make_classification(n=60)
    model = lambda: nn.Linear(8, 3)  # noqa: E731
    Evaluator().cross_validate(model, dataset, _config(tmp_path, num_epochs=1), n_folds=3)
    with pytest.raises(FileExistsError, match="already holds an earlier cross-validation's"):
        Evaluator().cross_validate(model, dataset, _config(tmp_path, num_epochs=1), n_folds=3)
    again = _config(tmp_path, num_epochs=1, overwrite_output_dir=True)
    result = Evaluator().cross_validate(model, dataset, again, n_folds=2)
    assert len(result["fold_checkpoints"]) == 2
    assert sorted(p.name for p in (tmp_path / "cv").glob("fold-*")) == ["fold-1", "fold-2"]


def test_a_failed_overwriting_cross_validation_puts_the_earlier_folds_back(tmp_path):
    """The earlier cross-validation's extra folds were deleted before the new one trained
    anything; it failed, and its summary named best.pt files that were gone."""
    dataset = make_classification(n=60)
    Evaluator().cross_validate(
        lambda: nn.Linear(8, 3), dataset, _config(tmp_path, num_epochs=1), n_folds=3
    )
    calls = []

    def second_fails():
        calls.append(1)
        return nn.Linear(8, 3) if len(calls) == 1 else "not a model"

    again = _config(tmp_path, num_epochs=1, overwrite_output_dir=True)
    with pytest.raises(TypeError, match="model_factory returned str"):
        Evaluator().cross_validate(second_fails, dataset, again, n_folds=2)
    assert (tmp_path / "cv" / "fold-3" / "checkpoints" / "best.pt").exists()
    assert not (tmp_path / "cv" / ".overwritten-folds").exists()


def _stopping_in_fold(monkeypatch, fold: int, step: int):
    """Every TrainingManager of fold `fold` gets a callback that stops it as a SIGTERM at
    update `step` would (cross_validate takes no callbacks of its own)."""
    from traineval.assembly import cross_validation
    from traineval.assembly.manager import TrainingManager

    from conftest import InterruptAt

    class Stopping(TrainingManager):
        def train(self, *args, **kwargs):
            if self.config.output_dir.endswith(f"fold-{fold}"):
                kwargs["callbacks"] = [InterruptAt(step)]
            return super().train(*args, **kwargs)

    monkeypatch.setattr(cross_validation, "TrainingManager", Stopping)


def test_a_stopped_cross_validation_resumes_to_the_uninterrupted_summary(tmp_path, monkeypatch):
    """A signal in fold 2 of 3 lost fold 1 (cross-validation did not resume). Resumed, the
    finished fold is kept as it was, fold 2 continues from its checkpoint, fold 3 trains:
    the summary and every fold's weights equal an uninterrupted cross-validation's."""
    from traineval.runs.checkpoint import load_checkpoint_file
    from traineval.training.stopping import TrainingInterrupted

    dataset = make_classification(n=96, seed=5)
    model = lambda: nn.Linear(8, 3)  # noqa: E731
    straight = Evaluator().cross_validate(model, dataset, _config(tmp_path / "a"), n_folds=3)
    config = _config(tmp_path / "b")
    with monkeypatch.context() as patch:
        _stopping_in_fold(patch, fold=2, step=7)  # 4 updates an epoch: inside epoch 2
        with pytest.raises(TrainingInterrupted, match=r"stopped in fold 2 .*resume=True"):
            Evaluator().cross_validate(model, dataset, config, n_folds=3)
    fold_1 = (tmp_path / "b" / "cv" / "fold-1" / "checkpoints" / "best.pt").read_bytes()
    assert not (tmp_path / "b" / "cv" / "fold-3").exists()
    resumed = Evaluator().cross_validate(model, dataset, config, n_folds=3, resume=True)
    assert (tmp_path / "b" / "cv" / "fold-1" / "checkpoints" / "best.pt").read_bytes() == fold_1

    def without_paths(summary):
        return {k: v for k, v in summary.items() if k not in ("folds", "fold_checkpoints",
                                                              "output_dir")}  # fmt: skip

    assert without_paths(resumed) == without_paths(straight)
    for a, b in zip(straight["folds"], resumed["folds"], strict=True):
        assert a["best_metrics"] == b["best_metrics"]
        assert a["best_epoch"] == b["best_epoch"]
        weights = [load_checkpoint_file(f["checkpoint"])["model"] for f in (a, b)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_cross_validation_resumes_only_as_it_began(tmp_path):
    dataset = make_classification(n=96, seed=5)
    model = lambda: nn.Linear(8, 3)  # noqa: E731
    config = _config(tmp_path, num_epochs=1)
    Evaluator().cross_validate(model, dataset, config, n_folds=3)
    with pytest.raises(ValueError, match=r"n_folds=4 \(--folds\), it began with 3"):
        Evaluator().cross_validate(model, dataset, config, n_folds=4, resume=True)
    with pytest.raises(ValueError, match="its folds hold other rows"):
        Evaluator().cross_validate(model, dataset, config.replace(seed=7), n_folds=3, resume=True)
    x, y = dataset.tensors
    edited = TensorDataset(x + 0.5, y)  # a table edited in place: the same folds, new values
    with pytest.raises(ValueError, match="the data's values differ from those it began with"):
        Evaluator().cross_validate(model, edited, config, n_folds=3, resume=True)
    with pytest.raises(ValueError, match=r"training\.learning_rate, training\.num_epochs differ"):
        Evaluator().cross_validate(
            model, dataset, config.replace(num_epochs=2, learning_rate=0.5), n_folds=3, resume=True
        )
    with pytest.raises(ValueError, match="needs the stopped cross-validation's folder: set"):
        Evaluator().cross_validate(model, dataset, config.replace(output_dir=None), resume=True)
    again = config.replace(overwrite_output_dir=True)
    with pytest.raises(ValueError, match="overwrite_output_dir=true replaces it: set one"):
        Evaluator().cross_validate(model, dataset, again, n_folds=3, resume=True)
    shown = config.replace(progress_bar=True, log_frequency=3)  # how it is shown: may differ
    finished = Evaluator().cross_validate(model, dataset, shown, n_folds=3, resume=True)
    assert len(finished["folds"]) == 3  # a finished one: its folds' results again


def test_a_fit_and_a_cross_validation_never_share_a_folder(tmp_path):
    """Each took the other's finished folder (exit 0): a fit's config.yaml replaced the one
    the folds are rebuilt from, a cross-validation's made the fit run read as one."""
    from traineval import TrainingManager

    dataset = make_classification(n=60)
    model = lambda: nn.Linear(8, 3)  # noqa: E731
    config = _config(tmp_path, num_epochs=1)
    Evaluator().cross_validate(model, dataset, config, n_folds=2)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"holds a cross-validation .*another output_dir"):
            TrainingManager(config.replace(overwrite_output_dir=overwrite)).train(
                model(), DataLoader(dataset, 16)
            )
    fit = config.replace(output_dir=str(tmp_path / "fit"))
    TrainingManager(fit).train(model(), DataLoader(dataset, 16))
    before = sorted(p.name for p in (tmp_path / "fit").iterdir())
    for resume in (False, True):
        with pytest.raises(FileExistsError, match=r"holds a training run .*not a cross-valid"):
            Evaluator().cross_validate(model, dataset, fit, n_folds=2, resume=resume)
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == before


def test_a_resume_after_a_stopped_overwrite_trains_the_earlier_folds_again(tmp_path, monkeypatch):
    """An overwriting cross-validation stopped in fold 2 left fold 3 of the earlier one,
    with its finished summary: the resume kept it, scoring a model of other data."""
    from traineval.training.stopping import TrainingInterrupted

    first = make_classification(n=96, seed=5)
    x, y = first.tensors
    second = TensorDataset(x + 3.0, y)
    model = lambda: nn.Linear(8, 3)  # noqa: E731
    straight = Evaluator().cross_validate(model, second, _config(tmp_path / "a"), n_folds=3)
    config = _config(tmp_path / "b")
    Evaluator().cross_validate(model, first, config, n_folds=3)
    again = config.replace(overwrite_output_dir=True)
    with monkeypatch.context() as patch:
        _stopping_in_fold(patch, fold=2, step=7)
        with pytest.raises(TrainingInterrupted):
            Evaluator().cross_validate(model, second, again, n_folds=3)
    resumed = Evaluator().cross_validate(model, second, config, n_folds=3, resume=True)
    for a, b in zip(straight["folds"], resumed["folds"], strict=True):
        assert a["best_metrics"] == b["best_metrics"]


def test_a_resume_where_there_is_no_cross_validation_says_it_starts_one(tmp_path, caplog):
    import logging

    dataset = make_classification(n=60)
    with caplog.at_level(logging.WARNING):
        Evaluator().cross_validate(
            lambda: nn.Linear(8, 3), dataset, _config(tmp_path, num_epochs=1), 2, resume=True
        )
    assert "no cross-validation to resume in" in caplog.text


def test_the_data_digest_takes_any_tensor_dataset():
    from traineval.assembly.cross_validation import data_digest

    complex_values = torch.randn(4, 2, dtype=torch.complex64).conj()  # a conjugate view
    sparse = torch.eye(4).to_sparse()
    for tensors in ((complex_values,), (sparse,), (torch.ones(4, dtype=torch.bool),)):
        digest = data_digest(TensorDataset(*tensors))
        assert digest is None or len(digest) == 16
    assert data_digest(TensorDataset(torch.ones(3))) != data_digest(TensorDataset(torch.zeros(3)))
