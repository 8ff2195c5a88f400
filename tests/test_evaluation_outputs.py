"""Score-based metrics against scikit-learn; predictions.csv; plots; split tagging."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch.utils.data import DataLoader, TensorDataset

from traineval import EvaluationConfig, EvaluationMode, Evaluator, TaskType
from traineval.evaluation import ProbabilityStats


def _scores(n=600, classes=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=generator)
    scores = torch.randn(n, classes, generator=generator, dtype=torch.float64)
    scores[torch.arange(n), targets] += 1.0  # informative, not perfect
    return scores, targets


def test_log_loss_top_k_and_roc_auc_stream_to_sklearn_values():
    scores, targets = _scores()
    stats = ProbabilityStats(6, top_k=3, keep_scores=True)
    for start in range(0, 600, 47):
        stats.update(scores[start : start + 47], targets[start : start + 47])
    ours = stats.compute()
    probabilities = torch.softmax(scores, dim=1).numpy()
    y = targets.numpy()
    assert ours["log_loss"] == pytest.approx(sk.log_loss(y, probabilities), rel=1e-10)
    assert ours["top_k_accuracy"] == pytest.approx(
        sk.top_k_accuracy_score(y, probabilities, k=3), abs=1e-12
    )
    assert ours["roc_auc"] == pytest.approx(
        sk.roc_auc_score(y, probabilities, multi_class="ovr", average="weighted"), rel=1e-12
    )


def test_binary_one_logit_log_loss_and_auc():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 1, generator=generator, dtype=torch.float64)
    targets = logits.reshape(-1) + torch.randn(300, generator=generator, dtype=torch.float64) > 0
    stats = ProbabilityStats(2, keep_scores=True)
    stats.update(logits, targets.long())
    p1 = torch.sigmoid(logits.reshape(-1)).numpy()
    ours = stats.compute()
    assert ours["log_loss"] == pytest.approx(sk.log_loss(targets.numpy(), p1), rel=1e-10)
    assert ours["roc_auc"] == pytest.approx(sk.roc_auc_score(targets.numpy(), p1), rel=1e-12)


def _model_and_loader(classes=3, n=90):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    torch.manual_seed(0)
    return torch.nn.Linear(4, classes), DataLoader(TensorDataset(x, y), batch_size=16)


def test_predictions_csv_is_streamed_with_probabilities(tmp_path):
    model, loader = _model_and_loader()
    evaluator = Evaluator(EvaluationConfig(save_predictions=True))
    evaluator.evaluate_model(model, loader, output_dir=tmp_path, split=EvaluationMode.TESTING)
    path = tmp_path / "evaluation" / "predictions_test.csv"
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 90
    assert list(rows[0]) == ["id", "target", "prediction", "prob_0", "prob_1", "prob_2"]
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
    assert [int(r["target"]) for r in rows] == y.tolist()
    assert [int(r["prediction"]) for r in rows] == expected.argmax(1).tolist()
    assert float(rows[5]["prob_1"]) == pytest.approx(expected[5, 1].item(), rel=1e-5)


def test_predictions_name_the_classes_when_the_evaluator_knows_them(tmp_path):
    model, loader = _model_and_loader()
    evaluator = Evaluator(EvaluationConfig(save_predictions=True))
    evaluator.class_names = ["cat", "dog", "owl"]
    evaluator.evaluate_model(model, loader, output_dir=tmp_path, split=EvaluationMode.TESTING)
    rows = list(csv.DictReader((tmp_path / "evaluation" / "predictions_test.csv").open()))
    assert list(rows[0]) == ["id", "target", "prediction", "prob_cat", "prob_dog", "prob_owl"]
    x, y = loader.dataset.tensors
    with torch.no_grad():
        predicted = model(x).argmax(1)
    names = ["cat", "dog", "owl"]
    assert [r["target"] for r in rows] == [names[i] for i in y.tolist()]
    assert [r["prediction"] for r in rows] == [names[i] for i in predicted.tolist()]
    written = (tmp_path / "evaluation" / "predictions_test.csv").read_bytes()
    evaluator.class_names = ["cat", "dog"]  # not one per class: refused (they were dropped)
    with pytest.raises(ValueError, match=r"class_names has 2 names \('cat', 'dog'\) for the 3"):
        evaluator.evaluate_model(model, loader, output_dir=tmp_path, split=EvaluationMode.TESTING)
    assert (tmp_path / "evaluation" / "predictions_test.csv").read_bytes() == written
    evaluator.class_names = ["cat", "cat", "owl"]
    with pytest.raises(ValueError, match="class_names names 'cat' twice"):
        evaluator.evaluate_model(model, loader, output_dir=tmp_path, split=EvaluationMode.TESTING)


def test_regression_predictions_and_plot(tmp_path):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, generator=generator)
    y = x.sum(1)
    model = torch.nn.Linear(3, 1)
    config = EvaluationConfig(save_predictions=True, plot_metrics=True, output_dir=str(tmp_path))
    evaluator = Evaluator(config)
    evaluator.evaluate_model(model, DataLoader(TensorDataset(x, y), batch_size=8))
    rows = list(csv.DictReader((tmp_path / "evaluation" / "predictions_val.csv").open()))
    assert len(rows) == 50
    assert float(rows[0]["target"]) == pytest.approx(y[0].item(), rel=1e-5)
    assert (tmp_path / "evaluation" / "predicted_vs_actual_val.png").stat().st_size > 1000


def test_classification_plots_are_written(tmp_path):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(80, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    evaluator = Evaluator(EvaluationConfig(plot_metrics=True, output_dir=str(tmp_path)))
    report = evaluator.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert set(report.files) == {"confusion_matrix", "roc_curve"}
    for path in report.files.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_need_a_place_to_go():
    model, loader = _model_and_loader()
    with pytest.raises(ValueError, match="need somewhere to write"):
        Evaluator(EvaluationConfig(save_predictions=True)).evaluate_model(model, loader)


def test_metrics_are_tagged_with_their_split():
    model, loader = _model_and_loader()
    evaluator = Evaluator()
    evaluator.evaluate_model(model, loader, split=EvaluationMode.TESTING)
    evaluator.evaluate_model(model, loader, split=EvaluationMode.TRAINING)
    assert "test_accuracy" in evaluator.metrics_tracker.metrics
    assert "train_loss" in evaluator.metrics_tracker.metrics
    value, _ = evaluator.metrics_tracker.get_best_metric("test_accuracy", minimize=False)
    assert value == evaluator.metrics_tracker.metrics["train_accuracy"]


def test_top_k_is_left_out_when_there_are_no_more_classes_than_k():
    scores, targets = _scores(classes=3)
    result = Evaluator(EvaluationConfig(top_k=5)).compute_metrics(scores, targets)
    assert "top_k_accuracy" not in result
    result = Evaluator(EvaluationConfig(top_k=2)).compute_metrics(
        scores, targets, TaskType.CLASSIFICATION
    )
    assert result["top_k_accuracy"] == pytest.approx(
        sk.top_k_accuracy_score(targets.numpy(), np.asarray(scores), k=2)
    )


def test_evaluation_options_take_the_task_split_and_loss_and_refuse_bad_values():
    from traineval import EvaluationOptions

    model, loader = _model_and_loader()
    evaluator = Evaluator()
    given = EvaluationOptions(task_type="classification", split="testing")
    assert (given.task_type, given.split) == (TaskType.CLASSIFICATION, EvaluationMode.TESTING)
    loss = torch.nn.CrossEntropyLoss()
    report = evaluator.evaluate(
        model, loader, EvaluationOptions(split="testing", loss_function=loss)
    )
    assert report.metrics == evaluator.evaluate_model(
        model, loader, None, loss, split=EvaluationMode.TESTING, task_type=TaskType.CLASSIFICATION
    )
    assert "test_accuracy" in evaluator.metrics_tracker.metrics
    with pytest.raises(ValueError, match=r"split='tst' is invalid: expected one of .*'testing'"):
        EvaluationOptions(split="tst")
    with pytest.raises(ValueError, match=r"task_type='text' is invalid: expected one of"):
        evaluator.evaluate_model(model, loader, task_type="text")
    with pytest.raises(ValueError, match=r"loss_function=3 is invalid: expected a callable"):
        EvaluationOptions(loss_function=3)
    with pytest.raises(ValueError, match=r"write_files='no' is invalid: expected true or false"):
        EvaluationOptions(write_files="no")
    with pytest.raises(ValueError, match=r"class_names='abc' is invalid: expected a list"):
        EvaluationOptions(class_names="abc")
    regression = EvaluationOptions(task_type=TaskType.REGRESSION)
    with pytest.raises(ValueError, match=r"differs from options\.task_type"):
        evaluator.evaluate(model, loader, regression, task_type=TaskType.CLASSIFICATION)
    with pytest.raises(TypeError, match="evaluate_ensemble takes no split"):
        evaluator.evaluate_ensemble([model], loader, split=EvaluationMode.TESTING)


def test_predict_options_refuse_a_bad_threshold_or_transform():
    from traineval.evaluation.inference import PredictOptions, predict

    with pytest.raises(
        ValueError, match=r"threshold=1\.5 is invalid: expected a number in \(0, 1\)"
    ):
        PredictOptions(threshold=1.5)
    with pytest.raises(ValueError, match=r"output_transform='logits' is invalid: expected a"):
        PredictOptions(output_transform="logits")
    x = torch.randn(8, 3)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        expected = (torch.sigmoid(model(x)) > 0.7).long()
    found = predict(model, [(x, torch.ones(8, 2))], PredictOptions(threshold=0.7))
    assert found.task is TaskType.MULTILABEL
    assert torch.equal(found.classes, expected)
