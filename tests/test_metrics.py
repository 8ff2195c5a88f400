"""Streaming metrics equal scikit-learn's on the concatenated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from sklearn.exceptions import UndefinedMetricWarning
from torch.utils.data import DataLoader, TensorDataset

from traineval import EvaluationConfig, EvaluationOptions, Evaluator, MetricsTracker, TaskType
from traineval.evaluation import ConfusionMatrix, RegressionStats, TokenStats
from traineval.tasks import detect_task


def _batches(*tensors, size):
    n = tensors[0].shape[0]
    for start in range(0, n, size):
        yield tuple(t[start : start + size] for t in tensors)


@pytest.mark.parametrize("average", ["weighted", "macro", "micro"])
def test_classification_metrics_stream_to_sklearn_values(average):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 5, generator=generator)
    targets = torch.randint(0, 5, (1000,), generator=generator)
    targets[targets == 4] = 3  # class 4 is predicted sometimes but never true
    cm = ConfusionMatrix(5)
    for s, t in _batches(scores, targets, size=37):
        cm.update(s, t)
    ours = cm.compute(average)
    y, p = targets.numpy(), scores.argmax(1).numpy()
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        y, p, average=average, zero_division=0
    )
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
    assert ours["precision"] == pytest.approx(precision, abs=1e-12)
    assert ours["recall"] == pytest.approx(recall, abs=1e-12)
    assert ours["f1"] == pytest.approx(f1, abs=1e-12)
    assert np.array_equal(cm.matrix().numpy(), sk.confusion_matrix(y, p, labels=range(5)))


@pytest.mark.parametrize("average", ["weighted", "macro", "micro"])
def test_multi_class_roc_auc_averages_as_the_config_says(average):
    """It was always the macro average, whatever `average` said (as precision, recall and
    F1 follow it, and multi-label roc_auc did)."""
    from traineval import EvaluationConfig, Evaluator

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 3, generator=generator) * 3
    targets = torch.distributions.Categorical(logits=logits).sample()
    targets[:40] = 0  # unequal supports: weighted differs from macro
    config = EvaluationConfig(classification_metrics=("roc_auc",), average=average)
    ours = Evaluator(config).compute_metrics(logits, targets)["roc_auc"]
    probabilities = torch.softmax(logits, 1).numpy()
    theirs = sk.roc_auc_score(targets.numpy(), probabilities, multi_class="ovr", average=average)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_a_model_ending_in_a_softmax_is_scored_on_its_probabilities(caplog, monkeypatch):
    """Probabilities were taken for logits: their softmax gave log_loss 0.78 and Brier 0.44
    where scikit-learn gives 0.52 and 0.29 (the classes' ranking, and so accuracy and
    roc_auc, were right)."""
    import logging

    from traineval import EvaluationConfig, Evaluator
    from traineval.evaluation import metrics
    from traineval.evaluation.metrics import class_probabilities

    monkeypatch.setattr(metrics, "_PROBABILITIES_SAID", [False])  # said once a process
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 3, generator=generator) * 3
    targets = torch.distributions.Categorical(logits=logits).sample()
    probabilities = torch.softmax(logits, 1)
    names = ("accuracy", "log_loss", "brier_score", "ece")
    evaluator = Evaluator(EvaluationConfig(classification_metrics=names))
    with caplog.at_level(logging.WARNING):
        ours = evaluator.compute_metrics(probabilities, targets)
    y, p = targets.numpy(), probabilities.numpy()
    assert ours["log_loss"] == pytest.approx(sk.log_loss(y, p), abs=1e-6)
    brier = ((p - np.eye(3)[y]) ** 2).sum(1).mean()
    assert ours["brier_score"] == pytest.approx(brier, abs=1e-6)
    assert ours == pytest.approx(evaluator.compute_metrics(logits, targets), abs=1e-6)
    assert "outputs are probabilities" in caplog.text
    assert torch.equal(class_probabilities(probabilities), probabilities)  # (predict's)
    shifted = torch.rand(5, 3)  # in [0, 1] but rows not summing to 1: logits
    assert torch.allclose(class_probabilities(shifted), torch.softmax(shifted, 1))
    # bf16 / fp16 softmax, one sample a batch: decided once, in the scores' own dtype
    for half in (torch.bfloat16, torch.float16):
        stats = metrics.ProbabilityStats(3)
        given = probabilities.to(half)
        for row, label in zip(given, targets, strict=True):
            stats.update(row[None], label[None])
        expected = sk.log_loss(y, given.double().numpy(), labels=[0, 1, 2])
        assert stats.compute()["log_loss"] == pytest.approx(expected, rel=1e-3), half


def test_binary_classification_with_one_logit():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.2])
    targets = torch.tensor([1, 0, 0, 0])
    result = Evaluator().compute_metrics(logits, targets, task_type=TaskType.CLASSIFICATION)
    assert result["accuracy"] == 0.75


@pytest.mark.parametrize("prediction_shape", [(500,), (500, 1)])
def test_regression_metrics_stream_to_sklearn_values(prediction_shape):
    generator = torch.Generator().manual_seed(1)
    targets = 100 + torch.randn(500, generator=generator, dtype=torch.float64)
    predictions = targets + 0.3 * torch.randn(500, generator=generator, dtype=torch.float64)
    stats = RegressionStats()
    for p, t in _batches(predictions.reshape(prediction_shape), targets, size=64):
        stats.update(p, t)
    ours = stats.compute()
    y, p = targets.numpy(), predictions.numpy()
    assert ours["mse"] == pytest.approx(sk.mean_squared_error(y, p), rel=1e-10)
    assert ours["mae"] == pytest.approx(sk.mean_absolute_error(y, p), rel=1e-10)
    assert ours["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y, p)), rel=1e-10)
    assert ours["r2_score"] == pytest.approx(sk.r2_score(y, p), rel=1e-10)
    assert ours["explained_variance"] == pytest.approx(sk.explained_variance_score(y, p), rel=1e-10)


def test_multi_output_regression_averages_outputs_like_sklearn():
    generator = torch.Generator().manual_seed(2)
    targets = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    predictions = targets + torch.randn(200, 3, generator=generator, dtype=torch.float64)
    stats = RegressionStats()
    for p, t in _batches(predictions, targets, size=30):
        stats.update(p, t)
    assert stats.compute()["r2_score"] == pytest.approx(
        sk.r2_score(targets.numpy(), predictions.numpy()), rel=1e-10
    )


def test_r2_of_a_constant_target_is_defined():
    stats = RegressionStats()
    stats.update(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))
    assert stats.compute()["r2_score"] == 1.0
    stats = RegressionStats()
    stats.update(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    assert stats.compute()["r2_score"] == sk.r2_score([2.0, 2.0], [1.0, 3.0]) == 0.0
    stats = RegressionStats()  # one sample: undefined, NaN as scikit-learn (it was 0.0)
    stats.update(torch.tensor([1.0]), torch.tensor([2.0]))
    with pytest.warns(UndefinedMetricWarning):
        expected = sk.r2_score([2.0], [1.0])
    assert math.isnan(stats.compute()["r2_score"])
    assert math.isnan(expected)
    # explained variance of one sample: scikit-learn's 1.0 (it was NaN here)
    assert stats.compute()["explained_variance"] == sk.explained_variance_score([2.0], [1.0]) == 1.0


def test_token_metrics_skip_padding():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 7, 11, generator=generator)
    targets = torch.randint(0, 11, (6, 7), generator=generator)
    targets[:, 5:] = -100
    stats = TokenStats()
    for lg, t in _batches(logits, targets, size=4):
        stats.update(lg, t)
    ours = stats.compute()
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert ours["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert ours["perplexity"] == pytest.approx(np.exp(expected.item()), rel=1e-6)
    accuracy = (logits.argmax(-1)[kept] == targets[kept]).double().mean().item()
    assert ours["token_accuracy"] == pytest.approx(accuracy)


def test_task_detection_from_shapes():
    assert detect_task(torch.zeros(4, 3)) is TaskType.CLASSIFICATION
    assert detect_task(torch.zeros(4)) is TaskType.REGRESSION
    assert detect_task(torch.zeros(4, 1)) is TaskType.REGRESSION
    assert detect_task(torch.zeros(4, 5, 9)) is TaskType.GENERATION
    assert detect_task(torch.zeros(4, 3), torch.full((4, 3), 0.5)) is TaskType.REGRESSION
    # a 0/1 matrix of the outputs' shape reads as multi-label targets (as scikit-learn does)
    assert detect_task(torch.zeros(4, 3), torch.zeros(4, 3)) is TaskType.MULTILABEL


def test_bad_inputs_get_clear_errors():
    cm = ConfusionMatrix(3)
    cm.update(torch.randn(4, 3), torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"1 target label is outside the classes \[0, 3\)"):
        cm.compute()
    # streamed: the first bad label by its position over all batches, ignored ones skipped
    cm = ConfusionMatrix(3)
    cm.update(torch.randn(3, 3), torch.tensor([0, -100, 2]))
    cm.update(torch.randn(4, 3), torch.tensor([1, 7, 2, -4]))
    with pytest.raises(ValueError, match=r"2 target labels .* label 7 at position 4 "):
        cm.compute()
    with pytest.raises(ValueError, match=r"label 5 at position 3 "):
        Evaluator().compute_metrics(torch.randn(5, 3), torch.tensor([0, 1, 2, 5, 1]))
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[float("nan"), 0, 0], [1, 0, 0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1 predictions contain NaN"):
        cm.compute()
    with pytest.raises(ValueError, match="no data"):
        ConfusionMatrix(3).compute()
    with pytest.raises(ValueError, match="no data"):
        RegressionStats().compute()
    with pytest.raises(ValueError, match=r"do not match targets of shape \(4,\)"):
        RegressionStats().update(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="do not match 3 classes"):
        ConfusionMatrix(3).update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


def test_evaluate_model_streams_a_loader_and_matches_sklearn():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(300, 6, generator=generator)
    y = torch.randint(0, 4, (300,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    evaluator = Evaluator(EvaluationConfig())
    report = evaluator.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32))
    result = report.metrics
    with torch.no_grad():
        scores = model(x)
    expected_loss = torch.nn.functional.cross_entropy(scores, y).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(y, scores.argmax(1)))
    assert report.confusion.sum() == 300
    with pytest.warns(FutureWarning, match="last_confusion_matrix is deprecated.*confusion"):
        assert evaluator.last_confusion_matrix.sum() == 300  # until 0.3
    assert model.training  # the model's mode is restored
    with pytest.raises(ValueError, match="yielded no batches"):
        evaluator.evaluate_model(model, [])


def test_metrics_tracker_best_and_unknown_names():
    tracker = MetricsTracker()
    for step, value in enumerate([0.5, 0.3, 0.4]):
        tracker.update({"val_loss": value, "val_accuracy": 1 - value}, step)
    assert tracker.get_best_metric("val_loss") == (0.3, 1)
    assert tracker.get_best_metric("val_accuracy", minimize=False) == (0.7, 1)
    with pytest.raises(KeyError, match=r"no metric named 'val_f1'; known metrics: val_accuracy"):
        tracker.get_best_metric("val_f1")


def test_ignored_targets_are_left_out_even_inside_the_class_range():
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]), torch.tensor([1, 0, 2]))
    assert cm.matrix().sum() == 2
    assert cm.compute()["accuracy"] == 1.0


def test_per_class_metrics_equal_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(200, 5, generator=generator)
    scores[:, 4] -= 10  # class 4 is never predicted
    labels = torch.randint(0, 4, (200,), generator=generator)  # and never occurs
    cm = ConfusionMatrix(5)
    for start in range(0, 200, 64):
        cm.update(scores[start : start + 64], labels[start : start + 64])
    expected = precision_recall_fscore_support(
        labels.numpy(), scores.argmax(1).numpy(), labels=range(5), average=None, zero_division=0
    )
    rows = cm.per_class()
    for j, name in enumerate(("precision", "recall", "f1", "support")):
        assert [row[name] for row in rows] == pytest.approx(list(expected[j]), abs=1e-12), name


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Guo et al.'s ECE written out sample by sample: top-label confidence in (b/B, (b+1)/B]."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    total = 0.0
    for b in range(bins):
        members = [i for i, c in enumerate(confidence) if b / bins < c <= (b + 1) / bins]
        if members:
            gap = np.mean(correct[members]) - np.mean(confidence[members])
            total += len(members) / len(labels) * abs(gap)
    return total


@pytest.mark.parametrize(("classes", "bins"), [(4, 15), (4, 7), (2, 10), (1, 15)])
def test_calibration_metrics_stream_to_their_references(tmp_path, classes, bins):
    """Brier score against scikit-learn; ECE against the definition; over 10 batches."""
    generator = torch.Generator().manual_seed(classes + bins)
    x = torch.randn(300, 6, generator=generator)
    y = torch.randint(0, max(classes, 2), (300,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, classes)
    with torch.no_grad():
        model.weight.mul_(3)  # confident, not calibrated: a large ECE to get right
        scores = model(x).double()
    if classes == 1:  # one binary logit
        positive = torch.sigmoid(scores[:, 0]).numpy()
        probabilities = np.stack([1 - positive, positive], axis=1)
        brier = sk.brier_score_loss(y.numpy(), positive)
    else:
        probabilities = torch.softmax(scores, dim=1).numpy()
        brier = sk.brier_score_loss(y.numpy(), probabilities, labels=range(classes))
    config = EvaluationConfig(
        classification_metrics=("accuracy", "brier_score", "ece"),
        calibration_bins=bins,
        plot_metrics=True,
        output_dir=str(tmp_path),
    )
    evaluator = Evaluator(config)
    loss = None
    if classes == 1:

        def loss(outputs, targets):
            return torch.nn.functional.binary_cross_entropy_with_logits(
                outputs[:, 0], targets.float()
            )

    report = evaluator.evaluate(
        model,
        DataLoader(TensorDataset(x, y), batch_size=30),
        EvaluationOptions(loss_function=loss),
        task_type=TaskType.CLASSIFICATION,
    )
    result = report.metrics
    assert result["brier_score"] == pytest.approx(brier, rel=1e-9)
    ece = expected_calibration_error(probabilities, y.numpy(), bins)
    assert ece > 0.05
    assert result["ece"] == pytest.approx(ece, rel=1e-9)
    assert report.files["reliability_diagram"].endswith("reliability_val.png")
    assert (tmp_path / "evaluation" / "reliability_val.png").stat().st_size > 1000


def test_calibration_metrics_are_opt_in_and_validated():
    assert "ece" not in EvaluationConfig().classification_metrics
    with pytest.raises(ValueError, match="calibration_bins=0 is invalid"):
        EvaluationConfig(calibration_bins=0)


def test_calibration_leaves_ignored_targets_out():
    from traineval.evaluation.metrics import ProbabilityStats

    generator = torch.Generator().manual_seed(1)
    scores = 3 * torch.randn(200, 5, generator=generator)
    targets = torch.randint(0, 5, (200,), generator=generator)
    targets[::4] = -100
    stats = ProbabilityStats(5, calibration_bins=10)
    for chunk in range(0, 200, 50):
        stats.update(scores[chunk : chunk + 50], targets[chunk : chunk + 50])
    kept = targets != -100
    probabilities = torch.softmax(scores.double(), dim=1)[kept].numpy()
    assert sum(stats.reliability()["count"]) == 150
    expected = expected_calibration_error(probabilities, targets[kept].numpy(), 10)
    assert stats.compute()["ece"] == pytest.approx(expected, rel=1e-9)
    brier = sk.brier_score_loss(targets[kept].numpy(), probabilities, labels=range(5))
    assert stats.compute()["brier_score"] == pytest.approx(brier, rel=1e-9)


def test_evaluate_model_takes_labels_as_floats_or_a_column_and_an_absent_device():
    """compute_metrics took them; evaluate_model failed in torch's cross-entropy ("expected
    target dtype to be Long", "0D or 1D target tensor expected"), and device='cuda' on a
    machine without CUDA was torch's AssertionError where training falls back to the CPU."""
    from traineval import Evaluator

    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    reference = Evaluator().evaluate_model(model, [(x, y)])
    for labels in (y.float(), y[:, None]):
        assert Evaluator().evaluate_model(model, [(x, labels)]) == reference
    if not torch.cuda.is_available():
        assert Evaluator().evaluate_model(model, [(x, y)], "cuda:0") == reference
