"""Multi-label classification: detection, loss, streaming metrics against scikit-learn,
training against a hand-written BCE loop, predictions and ensembles."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import (
    EvaluationConfig,
    Evaluator,
    TaskType,
    TrainingManager,
    TrainingMode,
)
from traineval.evaluation.metrics import MultilabelStats
from traineval.tasks import AutoLoss, MultilabelBCE, detect_task

from conftest import make_mlp, plain_sgd_config

LABELS = 5


def tagged(n: int = 96, seed: int = 0, integer: bool = False) -> TensorDataset:
    """8 features, 5 labels that depend on them; label 4 never occurs (an empty column)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    w = torch.randn(8, LABELS, generator=generator)
    y = (x @ w > 0.3).to(torch.int64 if integer else torch.float32)
    y[:, 4] = 0
    return TensorDataset(x, y)


def sklearn_metrics(scores: torch.Tensor, targets: torch.Tensor, average: str, threshold=0.5):
    predicted = (torch.sigmoid(scores) > threshold).int().numpy()
    truth = targets.int().numpy()
    options = {"average": average, "zero_division": 0}
    return {
        "accuracy": sk.accuracy_score(truth, predicted),
        "hamming_loss": sk.hamming_loss(truth, predicted),
        "precision": sk.precision_score(truth, predicted, **options),
        "recall": sk.recall_score(truth, predicted, **options),
        "f1": sk.f1_score(truth, predicted, **options),
    }


@pytest.mark.parametrize("average", ["weighted", "macro", "micro"])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_streamed_metrics_equal_scikit_learn(average, threshold):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(103, LABELS, generator=generator) * 2
    targets = tagged(103).tensors[1]
    stats = MultilabelStats(threshold)
    for start in range(0, 103, 10):  # in batches, the last one short
        stats.update(scores[start : start + 10], targets[start : start + 10])
    computed = stats.compute(average)
    expected = sklearn_metrics(scores, targets, average, threshold)
    assert computed.keys() == expected.keys()
    for name, value in expected.items():
        assert computed[name] == pytest.approx(value, abs=1e-12), name


def test_per_label_metrics_equal_scikit_learn():
    scores, targets = torch.randn(70, LABELS), tagged(70).tensors[1]
    stats = MultilabelStats()
    stats.update(scores, targets)
    predicted = (scores > 0).int().numpy()
    expected = sk.precision_recall_fscore_support(
        targets.int().numpy(), predicted, average=None, zero_division=0
    )
    rows = stats.per_class()
    for j, name in enumerate(("precision", "recall", "f1", "support")):
        assert [row[name] for row in rows] == pytest.approx(list(expected[j]), abs=1e-12), name


def test_shards_merge_into_the_whole():
    scores, targets = torch.randn(40, LABELS), tagged(40).tensors[1]
    whole, first, second = MultilabelStats(), MultilabelStats(), MultilabelStats()
    whole.update(scores, targets)
    first.update(scores[:25], targets[:25])
    second.update(scores[25:], targets[25:])
    first.merge(second)
    assert first.compute("macro") == whole.compute("macro")


def test_bad_multilabel_inputs_are_named():
    stats = MultilabelStats()
    with pytest.raises(ValueError, match=r"need 0/1 targets of the same shape, got \(4,\)"):
        stats.update(torch.randn(4, 3), torch.zeros(4))
    stats.update(torch.randn(2, 3), torch.tensor([[0, 1, 2], [1, 0, 0]]))
    with pytest.raises(ValueError, match="1 multi-label targets are neither 0 nor 1"):
        stats.compute()
    with pytest.raises(ValueError, match=r"multilabel_threshold=1\.0 is invalid"):
        EvaluationConfig(multilabel_threshold=1.0)
    with pytest.raises(ValueError, match="multilabel_metrics"):
        EvaluationConfig(multilabel_metrics=("accuracy", "auc"))


def test_indicator_targets_are_detected_as_multilabel():
    outputs = torch.randn(6, LABELS)
    for integer in (False, True):
        targets = tagged(6, integer=integer).tensors[1]
        assert detect_task(outputs, targets) is TaskType.MULTILABEL
        loss = AutoLoss()
        expected = nn.functional.binary_cross_entropy_with_logits(outputs, targets.float())
        assert torch.equal(loss(outputs, targets), expected)
        assert loss.task_type is TaskType.MULTILABEL
    # other float targets of the outputs' shape stay regression; so do binary ones when told
    assert detect_task(outputs, torch.randn(6, LABELS)) is TaskType.REGRESSION
    binary = tagged(6).tensors[1]
    assert detect_task(outputs, binary, multilabel=False) is TaskType.REGRESSION
    assert detect_task(outputs, torch.zeros(6, dtype=torch.long)) is TaskType.CLASSIFICATION


def test_an_autoencoder_on_binary_inputs_is_still_evaluated_as_regression():
    x = tagged(32).tensors[1]  # 0/1 "pixels"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(LABELS, 3), nn.ReLU(), nn.Linear(3, LABELS))
    metrics = Evaluator().evaluate_model(
        model, DataLoader(TensorDataset(x), batch_size=8), training_mode=TrainingMode.UNSUPERVISED
    )
    assert "mse" in metrics
    assert "hamming_loss" not in metrics


def test_training_equals_a_hand_written_bce_loop_and_reports_multilabel_metrics(quiet_config):
    x, y = tagged(136).tensors  # one labelling rule, split 96 / 40
    train, val = TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])
    model = make_mlp(classes=LABELS)
    reference = copy.deepcopy(model)
    config = plain_sgd_config(
        quiet_config, num_epochs=10, batch_size=16, learning_rate=0.5, monitor_metric="val_f1"
    )
    result = TrainingManager(config).train(
        model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16)
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(10):
        for x, y in DataLoader(train, batch_size=16):
            nn.functional.binary_cross_entropy_with_logits(reference(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    last = result.training_history["val_metrics"][-1]
    with torch.no_grad():
        scores = model(val.tensors[0])
    expected = sklearn_metrics(scores, val.tensors[1], "weighted")
    for name, value in expected.items():
        assert last[name] == pytest.approx(value, abs=1e-9), name
    loss = nn.functional.binary_cross_entropy_with_logits(scores, val.tensors[1])
    assert last["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert result.monitor_metric == "val_f1"
    assert last["f1"] > 0.7  # it learned the labels


def test_predictions_and_ensembles_use_per_label_probabilities(tmp_path):
    data = tagged(24, integer=True)
    members = [make_mlp(classes=LABELS, seed=s) for s in (0, 1)]
    evaluator = Evaluator(
        EvaluationConfig(save_predictions=True, output_dir=str(tmp_path), multilabel_threshold=0.4)
    )
    loader = DataLoader(data, batch_size=10)
    result = evaluator.evaluate_ensemble(members, loader)
    x, y = data.tensors
    with torch.no_grad():
        probabilities = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
    chosen = (probabilities > 0.4).int().numpy()
    assert result["ensemble"]["accuracy"] == pytest.approx(sk.accuracy_score(y.numpy(), chosen))
    assert result["ensemble"]["hamming_loss"] == pytest.approx(sk.hamming_loss(y.numpy(), chosen))
    with (tmp_path / "evaluation" / "predictions_ensemble.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "target", "prediction", *(f"prob_{j}" for j in range(LABELS))]
    assert len(rows) == 25
    first_truth = " ".join(str(j) for j in np.flatnonzero(y[0].numpy()))
    first_chosen = " ".join(str(j) for j in np.flatnonzero(chosen[0]))
    assert rows[1][:3] == ["0", first_truth, first_chosen]
    assert float(rows[1][3]) == pytest.approx(float(probabilities[0, 0]), rel=1e-5)


def test_the_bce_loss_accepts_integer_targets():
    outputs, targets = torch.randn(4, 3), torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    assert torch.equal(
        MultilabelBCE()(outputs, targets),
        nn.functional.binary_cross_entropy_with_logits(outputs, targets.float()),
    )


def test_cross_validation_folds_multilabel_data_unstratified(quiet_config):
    config = plain_sgd_config(quiet_config, num_epochs=2, batch_size=16, learning_rate=0.5)
    summary = Evaluator().cross_validate(
        lambda: make_mlp(classes=LABELS), tagged(60), config, n_folds=3
    )
    assert len(summary["folds"]) == 3
    assert 0 <= summary["hamming_loss_mean"] <= 1
    assert {"f1_mean", "f1_std", "accuracy_mean"} <= summary.keys()
    with pytest.raises(ValueError, match="stratify=True needs classification targets"):
        Evaluator().cross_validate(
            lambda: make_mlp(classes=LABELS), tagged(60), config, n_folds=3, stratify=True
        )


@pytest.mark.parametrize("average", ["weighted", "macro", "micro"])
def test_opt_in_ranked_metrics_equal_scikit_learn(average):
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(90, LABELS, generator=generator)
    targets = tagged(90).tensors[1]
    targets[::3, 4] = 1  # every label occurs: each has a ROC curve
    config = EvaluationConfig(
        average=average, multilabel_metrics=("f1", "roc_auc", "average_precision")
    )
    dataset = TensorDataset(scores, targets)
    metrics = Evaluator(config).evaluate_model(nn.Identity(), DataLoader(dataset, batch_size=20))
    assert set(metrics) == {"loss", "f1", "roc_auc", "average_precision"}
    probabilities = torch.sigmoid(scores.double()).numpy()
    options = {"average": average}
    expected_auc = sk.roc_auc_score(targets.numpy(), probabilities, **options)
    expected_ap = sk.average_precision_score(targets.numpy(), probabilities, **options)
    assert metrics["roc_auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert metrics["average_precision"] == pytest.approx(expected_ap, abs=1e-12)
    targets[:, 4] = 0  # a label that never occurs: ROC-AUC is undefined (NaN, as sklearn)
    stats = MultilabelStats(keep_scores=True)
    stats.update(scores, targets)
    with pytest.warns(UserWarning, match="ROC AUC score is not defined"):
        assert math.isnan(stats.compute("macro")["roc_auc"])


def test_a_later_batch_that_is_not_0_1_refuses_the_multi_label_guess(tmp_path):
    """The task is read from the first batch: counts whose first batch held only 0s and 1s
    trained as multi-label (binary cross-entropy on counts up to 8), silently."""
    from torch import nn

    from traineval import TrainingConfig, TrainingManager

    x = torch.randn(20, 4)
    counts = torch.cat([torch.randint(0, 2, (5, 2)), torch.randint(0, 9, (15, 2))]).float()
    counts[5, 0] = 7.0  # the second batch is surely not 0/1
    batches = [(x[i : i + 5], counts[i : i + 5]) for i in range(0, 20, 5)]
    config = TrainingConfig(output_dir=str(tmp_path), num_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="read as multi-label classification from the first"):
        TrainingManager(config).train(nn.Linear(4, 2), batches)
    from traineval import TaskType

    config = TrainingConfig(output_dir=str(tmp_path / "r"), num_epochs=1, progress_bar=False)
    done = TrainingManager(config).train(nn.Linear(4, 2), batches, task_type=TaskType.REGRESSION)
    assert done["global_step"] == 4


def test_the_multi_label_guess_is_checked_under_compile_too(monkeypatch):
    """CompiledLoss compiled the loss AutoLoss resolved to and skipped its check."""
    from traineval.tasks import AutoLoss, CompiledLoss

    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: fn)  # (compiling takes long)
    loss = CompiledLoss(AutoLoss())
    loss(torch.randn(4, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="read as multi-label classification"):
        loss(torch.randn(2, 2), torch.tensor([[3.0, 7.0], [0.0, 1.0]]))


@pytest.mark.parametrize(
    ("names", "separator"),
    [
        (["cat", "dog", "bird"], " "),
        (["has cat", "dog", "bird"], ";"),
        (["has cat", "a;b", "bird"], "|"),
    ],
)
def test_a_label_set_cell_splits_back_into_its_labels(tmp_path, names, separator):
    """Labels are joined by spaces unless a name holds one (a table's column 'has cat'):
    then by the first of ';' and '|' that no name holds. Both writers (the evaluator's
    predictions and `traineval predict`) split back into the indicator rows."""
    from traineval.commands.predict import _columns
    from traineval.config.training_config import TaskType
    from traineval.evaluation.predictions import PredictionWriter

    logits = torch.tensor([[3.0, 3.0, -3.0], [-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    path = tmp_path / "p.csv"
    with PredictionWriter(path, TaskType.MULTILABEL, class_names=names) as writer:
        writer.write(logits, targets)
    rows = list(csv.reader(path.open(newline="")))[1:]

    def indicators(cell: str) -> list[int]:
        chosen = set(cell.split(separator)) if cell else set()
        assert chosen <= set(names)
        return [int(name in chosen) for name in names]

    assert [indicators(row[1]) for row in rows] == targets.tolist()
    assert [indicators(row[2]) for row in rows] == (logits > 0).int().tolist()
    _, values = _columns(TaskType.MULTILABEL, logits, names, 0.5)
    assert [indicators(row[0]) for row in values] == (logits > 0).int().tolist()


def test_label_names_holding_every_separator_are_refused_by_name(tmp_path):
    from traineval.config.training_config import TaskType
    from traineval.evaluation.predictions import PredictionWriter

    path = tmp_path / "p.csv"
    path.write_text("earlier\n")
    names = ["a b", "c;d", "e|f"]
    with (
        pytest.raises(ValueError, match=r"hold a space, ';' and '\|' \(e\.g\. 'e\|f'\)"),
        PredictionWriter(path, TaskType.MULTILABEL, class_names=names) as writer,
    ):
        writer.write(torch.zeros(2, 3), torch.zeros(2, 3))
    assert path.read_text() == "earlier\n"  # the earlier file is kept
