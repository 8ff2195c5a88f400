"""Predictions and evaluations from Python: `traineval.predict(model, loader)` equals the
model's own forward pass, and `evaluate` returns one `EvaluationReport` with everything an
evaluation made, writing files only into the folder it is handed."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import confusion_matrix
from torch.utils.data import DataLoader, TensorDataset

import traineval
from traineval import EvaluationConfig, EvaluationOptions, Evaluator, TaskType

from conftest import make_classification, make_mlp


def test_predict_equals_the_models_forward_pass_in_the_loaders_order():
    data = make_classification(n=50, seed=3)
    model = make_mlp()
    model.train()  # dropout-free, but the mode must come back as it was
    found = traineval.predict(model, DataLoader(data, batch_size=16))
    inputs, targets = data.tensors
    with torch.no_grad():
        logits = model(inputs)
    assert found.task is TaskType.CLASSIFICATION
    torch.testing.assert_close(found.outputs, logits)
    torch.testing.assert_close(found.probabilities, torch.softmax(logits, 1))
    assert torch.equal(found.classes, logits.argmax(1))
    assert torch.equal(found.targets, targets)
    assert model.training
    arrays = found.numpy()
    assert arrays["classes"].shape == (50,)
    assert set(arrays) == {"outputs", "probabilities", "classes", "targets"}


def test_predict_keeps_a_float64_models_precision():
    """A float64 model's outputs came back as float32 (rounded to 7 digits)."""
    data = make_classification(n=20, seed=4)
    inputs = data.tensors[0].double()
    model = make_mlp().double()
    found = traineval.predict(model, DataLoader(TensorDataset(inputs), batch_size=8))
    with torch.no_grad():
        logits = model(inputs)
    assert found.outputs.dtype == found.probabilities.dtype == torch.float64
    assert torch.equal(found.outputs, logits)
    torch.testing.assert_close(found.probabilities, torch.softmax(logits, 1), rtol=0, atol=1e-15)


def test_predict_reads_inputs_only_batches_multilabel_and_regression():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=generator)
    model = torch.nn.Linear(4, 3)
    inputs_only = traineval.predict(model, DataLoader(TensorDataset(x), batch_size=8))
    assert inputs_only.targets is None
    assert inputs_only.classes.shape == (20,)
    labels = (torch.rand(20, 3, generator=generator) > 0.5).float()
    multilabel = traineval.predict(model, DataLoader(TensorDataset(x, labels), batch_size=8))
    assert multilabel.task is TaskType.MULTILABEL
    with torch.no_grad():
        expected = (torch.sigmoid(model(x)) > 0.5).long()
    assert torch.equal(multilabel.classes, expected)
    values = traineval.predict(torch.nn.Linear(4, 1), [x], task_type=TaskType.REGRESSION)
    assert values.probabilities is None
    assert values.classes is None
    assert values.outputs.shape == (20, 1)
    with pytest.raises(ValueError, match="yielded no batches"):
        traineval.predict(model, [])


def test_the_manager_predicts_on_its_device_and_precision(tmp_path):
    config = traineval.TrainingConfig(
        num_epochs=2, batch_size=16, learning_rate=0.05, warmup_steps=0, seed=0,
        output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False, precision="bf16",
    )  # fmt: skip
    manager = traineval.TrainingManager(config)
    model = make_mlp()
    data = make_classification(n=64, seed=1)
    manager.train(model, DataLoader(data, batch_size=16, shuffle=True))
    found = manager.predict(model, DataLoader(data, batch_size=32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(data.tensors[0]).float()
    torch.testing.assert_close(found.outputs, expected)  # the run's bf16 autocast, as trained
    assert found.classes.shape == (64,)


def test_evaluate_returns_one_report_and_writes_only_where_it_is_told(tmp_path):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(90, 5, generator=generator)
    y = torch.randint(0, 3, (90,), generator=generator)
    model = torch.nn.Linear(5, 3)
    config = EvaluationConfig(
        save_predictions=True, bootstrap_samples=50,
        classification_metrics=("accuracy", "f1", "confusion_matrix"),
    )  # fmt: skip
    evaluator = Evaluator(config)
    options = EvaluationOptions(
        class_names=["a", "b", "c"],
        row_ids=[f"r{i}" for i in range(90)],
        split=traineval.EvaluationMode.TESTING,
    )
    report = evaluator.evaluate(
        model, DataLoader(TensorDataset(x, y), batch_size=32), options, output_dir=tmp_path
    )
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert report.task is TaskType.CLASSIFICATION
    assert set(report.metrics) == {"loss", "accuracy", "f1"}
    assert (report.confusion == confusion_matrix(y, predicted, labels=[0, 1, 2])).all()
    assert [row["label"] for row in report.per_class] == ["a", "b", "c"]
    assert set(report.intervals) == {"accuracy", "f1"}
    written = tmp_path / "evaluation" / "predictions_test.csv"
    assert report.files == {"predictions": str(written)}
    assert written.read_text().splitlines()[1].startswith("r0,")
    # nothing of the evaluation stays on the evaluator: another call is not told the names
    again = evaluator.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32),
                               output_dir=tmp_path / "other")  # fmt: skip
    assert [row["label"] for row in again.per_class] == ["0", "1", "2"]
    # without a folder, a config that asks for files says where to give one
    with pytest.raises(ValueError, match="pass output_dir"):
        evaluator.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32))


def test_evaluate_model_is_the_reports_metrics_and_refuses_unknown_options():
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    model = torch.nn.Linear(4, 2)
    evaluator = Evaluator()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    assert evaluator.evaluate_model(model, loader) == evaluator.evaluate(model, loader).metrics
    with pytest.raises(TypeError, match=r"unknown evaluation option 'presicion'.*precision"):
        evaluator.evaluate_model(model, loader, presicion=None)
    with pytest.warns(FutureWarning, match="last_intervals is deprecated"):
        assert evaluator.last_intervals == {}


@pytest.mark.parametrize("outputs", [1, 2])
def test_a_threshold_decides_a_binary_classifiers_class(outputs):
    """PredictOptions(threshold=0.3) was ignored for a binary classifier (classes from 0.5):
    class 1 where its probability is above the threshold, as for multi-label."""
    from traineval.evaluation.inference import PredictOptions

    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, outputs), torch.randn(64, 4)
    task = TaskType.CLASSIFICATION
    found = traineval.predict(model, [x], task_type=task, options=PredictOptions(threshold=0.3))
    positive = found.probabilities[:, 1]
    assert torch.equal(found.classes, (positive > 0.3).long())
    assert int(((positive > 0.3) & (positive <= 0.5)).sum()) > 0  # the threshold decided some
    plain = traineval.predict(model, [x], task_type=task)
    assert torch.equal(plain.classes, found.probabilities.argmax(dim=1))
