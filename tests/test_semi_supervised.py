"""Semi-supervised mode against a hand-written pseudo-labelling loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingConfig, TrainingManager, TrainingMode
from traineval.loggers import read_jsonl
from traineval.modes import SemiSupervised, SemiSupervisedStep

from conftest import make_classification, make_mlp, plain_sgd_config

SEMI = TrainingMode.SEMI_SUPERVISED


def _partly_labeled(n: int = 48, unlabeled_every: int = 3) -> TensorDataset:
    x, y = make_classification(n=n).tensors
    y = y.clone()
    y[::unlabeled_every] = -1
    return TensorDataset(x, y)


def _reference(model, data, batch, epochs, lr, threshold, weight):
    """The objective written out plainly: boolean indexing, Python branches, SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kept_total = 0
    rates = []
    for _ in range(epochs):
        for x, y in DataLoader(data, batch):
            out = model(x)
            lab = y != -1
            loss = F.cross_entropy(out[lab], y[lab]) if lab.any() else out.sum() * 0
            if (~lab).any():
                probs = out[~lab].detach().softmax(1)
                confidence, pseudo = probs.max(1)
                mask = confidence >= threshold
                kept_total += int(mask.sum())
                rates.append(float(mask.float().mean()))
                terms = F.cross_entropy(out[~lab], pseudo, reduction="none") * mask
                loss = loss + weight * terms.sum() / (~lab).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return kept_total, rates


def test_semi_supervised_training_equals_a_hand_written_pseudo_label_loop(quiet_config, tmp_path):
    data = _partly_labeled()
    mode = SemiSupervised(pseudo_label_threshold=0.45, unlabeled_weight=0.5)
    config = plain_sgd_config(
        quiet_config, num_epochs=3, batch_size=8, learning_rate=0.1, log_frequency=18
    )
    ours, theirs = make_mlp(), make_mlp()
    TrainingManager(config).train(ours, DataLoader(data, 8), mode=mode)
    kept, rates = _reference(theirs, data, 8, 3, 0.1, threshold=0.45, weight=0.5)
    assert 0 < kept < 3 * 16  # some, not all, unlabeled samples passed the threshold
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert logged[-1]["train_pseudo_label_rate"] == pytest.approx(np.mean(rates))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_train_like_one_big_batch(quiet_config):
    """Micro-batches with different labeled / unlabeled counts: each term is normalised by
    the window's count of its samples, not averaged per micro-batch."""
    data = _partly_labeled(n=48, unlabeled_every=3)
    data.tensors[1][4:8] = -1  # one micro-batch without labels, others with 1-2 unlabeled
    mode = SemiSupervised(pseudo_label_threshold=0.4, unlabeled_weight=2.0)
    models = []
    for batch, accumulation in ((12, 1), (4, 3)):
        model = make_mlp()
        config = plain_sgd_config(
            quiet_config,
            num_epochs=2,
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.2,
        )
        TrainingManager(config).train(model, DataLoader(data, batch), mode=mode)
        models.append(model)
    reference = make_mlp()
    kept, _ = _reference(reference, data, 12, 2, 0.2, threshold=0.4, weight=2.0)
    assert 0 < kept < 2 * 20
    for a, b, c in zip(*(m.parameters() for m in models), reference.parameters(), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_per_term_counts_without_terms_are_refused(quiet_config, monkeypatch):
    original = SemiSupervisedStep.__call__

    def without_terms(self, model, batch):
        out = original(self, model, batch)
        out.terms = None
        return out

    monkeypatch.setattr(SemiSupervisedStep, "__call__", without_terms)
    config = TrainingConfig(
        num_epochs=1, batch_size=4, gradient_accumulation_steps=2, **quiet_config
    )
    with pytest.raises(ValueError, match=r"per-term counts of shape \(2,\) but its StepOutput"):
        TrainingManager(config).train(make_mlp(), DataLoader(_partly_labeled(), 4), mode=SEMI)


def test_fully_labeled_batches_train_like_supervised(quiet_config):
    data = make_classification(n=48)
    results = []
    for mode in (TrainingMode.SUPERVISED, SEMI):
        model = make_mlp()
        config = TrainingConfig(
            num_epochs=2, batch_size=8, overwrite_output_dir=True, **quiet_config
        )
        TrainingManager(config).train(model, DataLoader(data, 8), mode=mode)
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results), strict=True):
        torch.testing.assert_close(a, b)


def test_the_pseudo_label_term_follows_threshold_and_weight():
    outputs = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 3.0]], requires_grad=True)
    targets = torch.tensor([0, -1, -1])
    step = SemiSupervisedStep(threshold=0.9, unlabeled_weight=2.0)
    loss = step.loss(outputs, targets)
    # labeled: CE(row 0, 0); unlabeled: only row 2 is confident (p=0.953), pseudo-label 1;
    # the unlabeled mean divides by both unlabeled samples.
    expected = (
        F.cross_entropy(outputs[:1], targets[:1])
        + 2.0 * F.cross_entropy(outputs[2:], torch.tensor([1])) / 2
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert outputs.grad is not None
    assert outputs.grad[1].abs().sum() == 0


def test_a_micro_batch_without_labels_gives_a_finite_loss():
    step = SemiSupervisedStep(threshold=0.0)
    loss = step.loss(torch.randn(4, 3, requires_grad=True), torch.full((4,), -1))
    assert torch.isfinite(loss)
    loss = step.loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(loss)


def test_semi_supervised_errors_name_what_is_wrong(quiet_config, tmp_path):
    config = TrainingConfig(num_epochs=1, batch_size=8, **quiet_config)
    data = _partly_labeled()
    with pytest.raises(ValueError, match="loss_function is not used in mode='semi_supervised'"):
        TrainingManager(config).train(
            make_mlp(), DataLoader(data, 8), mode=SEMI, loss_function=nn.CrossEntropyLoss()
        )
    assert not (tmp_path / "run").exists()
    floats = TensorDataset(torch.randn(8, 8), torch.randn(8))
    with pytest.raises(ValueError, match="needs \\(inputs, class ids\\) batches"):
        TrainingManager(config).train(make_mlp(), DataLoader(floats, 8), mode=SEMI)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("unlabeled_label", 3, "expected a negative integer"),
        ("unlabeled_weight", -1.0, "expected a finite number >= 0"),
        ("pseudo_label_threshold", 1.5, "expected a number in \\[0, 1\\]"),
    ],
)
def test_semi_supervised_settings_are_validated(field, value, message):
    with pytest.raises(
        ValueError, match=f"semi_supervised.{field}={value!r} is invalid: {message}"
    ):
        SemiSupervised(**{field: value})


def test_custom_unlabeled_marker(quiet_config):
    data = _partly_labeled()
    x, y = data.tensors
    marked = TensorDataset(x, torch.where(y == -1, -7, y))
    models = []
    for dataset, marker in ((data, -1), (marked, -7)):
        model = make_mlp()
        config = TrainingConfig(
            num_epochs=1,
            batch_size=8,
            **{**quiet_config, "overwrite_output_dir": True},
        )
        mode = SemiSupervised(unlabeled_label=marker, pseudo_label_threshold=0.3)
        TrainingManager(config).train(model, DataLoader(dataset, 8), mode=mode)
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b)


def test_hide_labels_keeps_a_stratified_seeded_share():
    from traineval.data import hide_labels, load_builtin, make_splits

    train = make_splits(load_builtin("iris"), val_fraction=0.2, test_fraction=0.2, seed=3).train
    hidden = hide_labels(train, 0.2, -1, seed=0)
    y, kept = train.tensors[1], hidden.tensors[1]
    assert int((kept != -1).sum()) == 18  # 20% of 90, six per class
    assert torch.bincount(kept[kept != -1]).tolist() == [6, 6, 6]
    assert torch.equal(kept[kept != -1], y[kept != -1])  # kept labels are the true ones
    assert torch.equal(hide_labels(train, 0.2, -1, seed=0).tensors[1], kept)
    assert not torch.equal(hide_labels(train, 0.2, -1, seed=1).tensors[1], kept)
    dropped = hide_labels(train, 0.2, -1, seed=0, drop=True)
    assert torch.equal(dropped.tensors[1], kept[kept != -1])
    assert torch.equal(dropped.tensors[0], train.tensors[0][kept != -1])


def test_semi_supervised_from_the_command_line(tmp_path):
    from traineval.cli import main
    from traineval.commands.experiment import RunConfig

    args = ["demo", "-q", "training.num_epochs=4", "training.warmup_steps=0"]
    args += ["data.labeled_fraction=0.2"]
    assert main([*args, "mode=semi_supervised", f"training.output_dir={tmp_path / 's'}"]) == 0
    assert main([*args, f"training.output_dir={tmp_path / 'b'}"]) == 0  # labeled rows only
    record = json.loads((tmp_path / "s" / "evaluation" / "metrics.json").read_text())
    assert record["test"]["accuracy"] > 0.5
    saved = (tmp_path / "s" / "config.yaml").read_text()
    assert "labeled_fraction: 0.2" in saved
    assert RunConfig.from_yaml(tmp_path / "s" / "config.yaml").mode.name == "semi_supervised"


def test_labeled_fraction_is_validated_against_the_mode():
    from traineval.commands.experiment import RunConfig

    with pytest.raises(ValueError, match=r"data.labeled_fraction=0.5 is invalid: hiding labels"):
        RunConfig.from_dict({"mode": "unsupervised", "data": {"labeled_fraction": 0.5}})
    with pytest.raises(ValueError, match=r"data.labeled_fraction=0 is invalid"):
        RunConfig.from_dict({"mode": "semi_supervised", "data": {"labeled_fraction": 0}})


def test_cross_validation_validates_on_labeled_rows_only(tmp_path, capsys):
    from traineval.cli import main

    config = tmp_path / "cv.yaml"
    config.write_text(
        "data: {name: iris, labeled_fraction: 0.5}\nmode: semi_supervised\n"
        "model: {name: mlp, options: {hidden_sizes: [16]}}\n"
        "training: {num_epochs: 3, warmup_steps: 0, early_stopping_patience: 0, "
        "learning_rate: 1e-2, tensorboard_logging: false}\n"
    )
    out = tmp_path / "o"
    assert main(["cv", str(config), "--folds", "3", "-q", f"training.output_dir={out}"]) == 0
    summary = json.loads((out / "evaluation" / "cv.json").read_text())
    # the labeled half of the 104 train rows, and the 23 (labeled) val rows
    assert sum(f["validation_size"] for f in summary["folds"]) == 52 + 23
    assert summary["accuracy_mean"] > 0.3


def test_evaluating_the_train_split_scores_only_its_labeled_rows(tmp_path):
    """Was: `evaluate --split train` of a run with labeled_fraction failed on the hidden
    labels ("Target -1 is out of bounds")."""
    from traineval.cli import main
    from traineval.commands.experiment import RunConfig, run_parts

    config = tmp_path / "ssl.yaml"
    config.write_text(
        "data: {name: iris, labeled_fraction: 0.3}\n"
        "model: {name: mlp, options: {hidden_sizes: [8]}}\n"
        "mode: {name: semi_supervised}\n"
        "training: {num_epochs: 1, progress_bar: false, tensorboard_logging: false}\n"
    )
    run = tmp_path / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    assert main(["evaluate", str(run), "--split", "train"]) == 0
    scored = json.loads((run / "evaluation" / "metrics_train.json").read_text())
    labels = run_parts(RunConfig.from_yaml(config)).splits.train.tensors[1]
    labeled = int((labels >= 0).sum())
    assert 0 < labeled < len(labels)
    assert sum(row["support"] for row in scored["per_class"]) == labeled
