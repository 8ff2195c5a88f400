"""The Evaluator at its edges, each against a reference (scikit-learn or a hand computation):
ensembles of softmax-ending members, tied top-k scores, bad targets, one-logit binary
classifiers, predictions files and grouped, stratified folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traineval
from traineval import EvaluationConfig, Evaluator


class Fixed(nn.Module):
    """A model that returns fixed rows (its input is the row's index): the outputs a test
    wants, probabilities or logits."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = nn.Parameter(rows, requires_grad=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows[index]


def _indexed(targets: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(len(targets)), targets), batch_size=batch_size)


def _normalised(probabilities: torch.Tensor) -> np.ndarray:
    """float64 probabilities whose rows sum to 1 as scikit-learn checks them."""
    p = probabilities.double()
    return (p / p.sum(1, keepdim=True)).numpy()


PROBABILITY_METRICS = EvaluationConfig(classification_metrics=["accuracy", "log_loss", "roc_auc"])


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_an_ensemble_averages_its_members_probabilities_whatever_they_output(kind):
    """Members ending in a softmax were softmaxed again: a one-member ensemble had log_loss
    0.76 where its member (and scikit-learn) had 0.37, and the predicted class could flip."""
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(40, 3, generator=generator) * 2 for _ in range(3)]
    targets = torch.randint(0, 3, (40,), generator=generator)
    probabilities = [torch.softmax(lg, 1) for lg in logits]
    members = [
        Fixed(p if kind == "probabilities" else lg)
        for p, lg in zip(probabilities, logits, strict=True)
    ]
    evaluator = Evaluator(PROBABILITY_METRICS)
    loader = _indexed(targets, batch_size=16)
    one = evaluator.evaluate_ensemble(members[:1], loader)
    y, p = targets.numpy(), _normalised(probabilities[0])
    # (the loss is cross-entropy, which takes logits: a probability member's own loss is
    # that of their softmax; the ensemble returns log-probabilities, whose loss is log_loss)
    alone = {name: value for name, value in one["members"][0].items() if name != "loss"}
    assert {k: v for k, v in one["ensemble"].items() if k != "loss"} == pytest.approx(
        alone, abs=1e-6
    )
    assert one["ensemble"]["log_loss"] == pytest.approx(sk.log_loss(y, p), abs=1e-6)
    assert one["ensemble"]["loss"] == pytest.approx(sk.log_loss(y, p), abs=1e-6)
    together = evaluator.evaluate_ensemble(members, loader)["ensemble"]
    mean = _normalised(torch.stack(probabilities).mean(0))
    assert together["log_loss"] == pytest.approx(sk.log_loss(y, mean), abs=1e-6)
    assert together["accuracy"] == sk.accuracy_score(y, mean.argmax(1))
    assert together["roc_auc"] == pytest.approx(
        sk.roc_auc_score(y, mean, multi_class="ovr", average="weighted"), abs=1e-6
    )


def test_an_ensemble_of_probabilities_predicts_the_class_of_their_mean():
    """The second softmax flattened the members towards uniform and chose class 1 here."""
    first = Fixed(torch.tensor([[0.7634, 0.0056, 0.2310]]))
    second = Fixed(torch.tensor([[0.1211, 0.8702, 0.0087]]))
    mean = (first.rows + second.rows) / 2  # [0.442, 0.438, 0.120]: class 0
    result = Evaluator().evaluate_ensemble([first, second], _indexed(torch.tensor([0])))
    assert int(mean.argmax()) == 0
    assert result["ensemble"]["accuracy"] == 1.0


def test_ensembles_of_no_members_or_of_different_classes_are_refused_first():
    """A torch stack error came after every member had been evaluated; an empty list was
    an IndexError."""
    evaluated = []

    class Counted(nn.Linear):
        def forward(self, x):
            evaluated.append(self.out_features)
            return super().forward(x)

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), 5)
    with pytest.raises(
        ValueError,
        match=r"models_or_checkpoint_paths\[1\] predicts shape \(5, 4\) \(4 classes.* "
        r"models_or_checkpoint_paths\[0\] predicts \(5, 3\) \(3\)",
    ):
        Evaluator().evaluate_ensemble([Counted(4, 3), Counted(4, 4), Counted(4, 3)], loader)
    assert evaluated == [3, 4, 3]  # one batch each: no member was evaluated in full
    with pytest.raises(ValueError, match=r"\[1\] predicts shape \(5, 2\) \(2 classes"):
        Evaluator().evaluate_ensemble([Counted(4, 1), Counted(4, 2)], loader)
    with pytest.raises(ValueError, match="models_or_checkpoint_paths is empty"):
        Evaluator().evaluate_ensemble([], loader)


@pytest.mark.parametrize("case", ["constant", "quantised", "untied"])
def test_top_k_accuracy_ranks_ties_as_scikit_learn_does(case):
    """Every class tied with the target counted as a hit: a collapsed model (all logits
    equal) scored 1.0 where scikit-learn (and torchmetrics) give 0.5, and logits in steps
    of 0.5 scored 0.0825 against scikit-learn's 0.0475."""
    generator = torch.Generator().manual_seed(0)
    classes = 10 if case == "constant" else 100
    targets = torch.randint(0, classes, (2000,), generator=generator)
    logits = torch.randn(2000, classes, generator=generator) * 2
    if case == "constant":  # every class as often: half of them rank in the top 5
        logits, targets = torch.zeros(2000, classes), torch.arange(2000) % classes
    elif case == "quantised":
        logits = torch.round(logits) / 2
    config = EvaluationConfig(classification_metrics=["top_k_accuracy"], top_k=5)
    ours = Evaluator(config).compute_metrics(logits, targets)["top_k_accuracy"]
    expected = sk.top_k_accuracy_score(targets, logits.numpy(), k=5, labels=range(classes))
    assert ours == pytest.approx(expected, abs=1e-12)
    if case == "constant":
        assert ours == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_regression_targets_that_are_not_finite_are_left_out_of_their_outputs_scores(bad, caplog):
    """A missing target (NaN, or inf) is left out of its output's scores: each output is
    scored as scikit-learn scores its column with those rows dropped, averaged uniformly.
    They had made every metric NaN, so a run whose loss masks missing targets could not be
    scored or stopped early on val_mae. Streamed in batches of 7, in compute_metrics, and in
    the bootstrap intervals (finite, around the value)."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    predictions = targets + 0.3 * torch.randn(40, 3, generator=generator, dtype=torch.float64)
    missing = torch.rand(40, 3, generator=generator) < 0.25
    targets[missing] = bad
    y, p, kept = targets.numpy(), predictions.numpy(), ~missing.numpy()
    references = {
        "mse": sk.mean_squared_error,
        "mae": sk.mean_absolute_error,
        "r2_score": sk.r2_score,
        "explained_variance": sk.explained_variance_score,
    }
    expected = {
        name: np.mean([fn(y[kept[:, j], j], p[kept[:, j], j]) for j in range(3)])
        for name, fn in references.items()
    }
    config = EvaluationConfig(bootstrap_samples=200, regression_metrics=(*references, "rmse"))
    with caplog.at_level("WARNING"):
        scored = Evaluator(config).compute_metrics(predictions, targets)
        loader = DataLoader(TensorDataset(predictions, targets), batch_size=7)
        report = Evaluator(config).evaluate(nn.Identity(), loader, task_type="regression")
    for metrics in (scored, report.metrics):
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-9), name
    low, high = report.intervals["mae"]
    assert low < report.metrics["mae"] < high
    assert all(np.isfinite(report.intervals[name]).all() for name in expected)
    assert caplog.text.count(f"{int(missing.sum())} regression targets are NaN or infinite") == 2


def test_an_output_without_a_finite_target_scores_nan():
    import math

    targets = torch.tensor([[1.0, math.nan], [2.0, math.nan], [3.5, math.nan]])
    scored = Evaluator().compute_metrics(targets.clone().nan_to_num(0.0), targets)
    assert all(math.isnan(scored[name]) for name in ("mse", "mae", "rmse", "r2_score"))
    one = Evaluator().compute_metrics(torch.tensor([1.0, 2.0]), torch.tensor([1.5, math.nan]))
    assert one["mae"] == 0.5
    assert math.isnan(one["r2_score"])  # one sample: undefined, as scikit-learn's


@pytest.mark.parametrize("shape", ["column", "flat"])
def test_one_logit_beside_integer_labels_0_and_1_is_a_binary_classifier(shape):
    """docs/evaluation.md: one output a sample is a binary logit. Without task_type the
    evaluator scored such a perfect classifier as regression (mse 16, R² -64)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = (x[:, 0] + 0.5 * torch.randn(64, generator=generator) > 0).long()
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
        model.bias.zero_()
        logit = model(x) if shape == "column" else model(x).reshape(-1)
    probability = torch.sigmoid(logit.reshape(-1)).double().numpy()
    expected = {
        "accuracy": sk.accuracy_score(y, probability > 0.5),
        "f1": sk.f1_score(y, probability > 0.5, average="weighted"),
        "log_loss": sk.log_loss(y, probability),
    }
    report = Evaluator().score(logit, y)
    assert report.task.value == "classification"
    assert {k: report.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    if shape == "column":
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        evaluated = Evaluator().evaluate(model, loader)
        assert evaluated.task.value == "classification"
        assert evaluated.metrics["loss"] == pytest.approx(expected["log_loss"], abs=1e-6)
        assert {k: evaluated.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-6)
        # traineval.predict reads the same outputs the same way (it read regression)
        found = traineval.predict(model, loader)
        assert found.task.value == "classification"
        assert torch.equal(found.classes, torch.from_numpy(probability > 0.5).long())
        assert found.probabilities[:, 1].double().numpy() == pytest.approx(probability)
        unlabeled = traineval.predict(model, DataLoader(x, batch_size=16))
        assert unlabeled.task.value == "regression"  # no labels to tell: its shapes' reading


def test_one_output_beside_other_integer_or_float_targets_stays_regression():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 10, (50,), generator=generator)  # counts, say
    predictions = targets + torch.randn(50, 1, generator=generator).reshape(-1)
    for given in (targets, targets.float(), (targets % 2).float()):
        report = Evaluator().score(predictions[:, None], given)
        assert report.task.value == "regression"
        expected = sk.mean_squared_error(given.numpy(), predictions.numpy())
        assert report.metrics["mse"] == pytest.approx(expected, rel=1e-6)


def test_float_labels_that_are_not_whole_numbers_are_refused_by_compute_metrics():
    """ConfusionMatrix truncated [0.4, 1.9, 1.2, -0.7] to classes [0, 1, 1, 0] and reported
    accuracy 1.0; evaluate's loss refuses them, and so does scikit-learn."""
    scores = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0.0, 1.9, 1.2, -0.7])
    with pytest.raises(ValueError, match="continuous"):
        sk.accuracy_score(targets.numpy(), scores.argmax(1).numpy())
    message = r"targets holds 3 values that are not class labels, the first 1.9 at position 1"
    with pytest.raises(ValueError, match=message):
        Evaluator().compute_metrics(scores, targets)
    with pytest.raises(ValueError, match="not class labels, the first nan"):
        Evaluator().score(scores, torch.tensor([0.0, 1.0, float("nan"), 0.0]))
    whole = Evaluator().compute_metrics(scores, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert whole["accuracy"] == sk.accuracy_score([0, 1, 0, 0], [0, 1, 1, 0])


def test_compute_metrics_takes_numpy_lists_and_a_task_by_its_value():
    """A task given by its value was a KeyError, NumPy or list inputs AttributeErrors."""
    scores = torch.tensor([[2.0, 0.1], [0.2, 1.5], [1.0, 0.0]])
    targets = [0, 1, 1]
    expected = Evaluator().compute_metrics(scores, torch.tensor(targets))
    assert expected["accuracy"] == sk.accuracy_score(targets, [0, 1, 0])
    evaluator = Evaluator()
    assert evaluator.compute_metrics(scores, targets, task_type="classification") == expected
    assert evaluator.compute_metrics(scores.numpy(), np.array(targets)) == expected
    assert evaluator.compute_metrics(scores.tolist(), targets) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"task_type='classify' is invalid: expected one of"):
        evaluator.compute_metrics(scores, targets, task_type="classify")
    with pytest.raises(TypeError, match="targets of type list cannot be read as numbers"):
        evaluator.compute_metrics(scores, ["a", "b", "b"])


def test_generation_predictions_skip_the_configured_ignore_index(tmp_path):
    """The file counted targets equal to -100 out, not `ignore_index`: with padding 0 it
    gave 4 tokens and accuracy 0.5 for both rows while the metrics said 0.8 overall."""
    pad = 0

    class Ones(nn.Module):  # predicts token 1 everywhere
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return nn.functional.one_hot(torch.ones_like(x), 5).float() * 5 + self.w

    targets = torch.tensor([[1, 1, pad, pad], [1, 2, 1, pad]])
    loader = DataLoader(TensorDataset(torch.ones(2, 4, dtype=torch.long), targets), 2)
    config = EvaluationConfig(ignore_index=pad, save_predictions=True)
    report = Evaluator(config).evaluate(Ones(), loader, output_dir=tmp_path)
    kept = targets != pad
    by_hand = [
        (int(k.sum()), float((t[k] == 1).double().mean()))
        for t, k in zip(targets, kept, strict=True)
    ]
    assert by_hand == [(2, 1.0), (3, 2 / 3)]
    assert report.metrics["token_accuracy"] == pytest.approx(4 / 5)
    lines = Path(report.files["predictions"]).read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    assert [int(tokens) for _, tokens, _ in rows] == [2, 3]
    assert [float(accuracy) for *_, accuracy in rows] == pytest.approx([1.0, 2 / 3], abs=1e-6)


@pytest.mark.parametrize("count", [8, 20])
def test_row_ids_of_another_length_than_the_rows_are_refused(tmp_path, count):
    """8 ids for 12 rows gave ids then positions (patient-0 .. patient-7, 8, 9, 10, 11), 20
    were cut to 12, silently: ids that do not fit do not line up with the loader's rows."""
    from traineval import EvaluationOptions

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(12, 3), torch.randint(0, 3, (12,))), 5)
    evaluator = Evaluator(EvaluationConfig(save_predictions=True))
    ids = [f"patient-{i}" for i in range(12)]
    report = evaluator.evaluate(
        nn.Identity(), loader, EvaluationOptions(row_ids=ids), output_dir=tmp_path
    )
    written = Path(report.files["predictions"]).read_text()
    assert [line.split(",")[0] for line in written.splitlines()[1:]] == ids
    wrong = EvaluationOptions(row_ids=[f"patient-{i}" for i in range(count)])
    with pytest.raises(ValueError, match=f"row_ids has {count} ids for the 12 rows evaluated"):
        evaluator.evaluate(nn.Identity(), loader, wrong, output_dir=tmp_path)
    assert Path(report.files["predictions"]).read_text() == written  # the earlier file stays


def _iris_with_patients():
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    groups = np.random.default_rng(92).integers(0, 25, 150)  # 25 patients, classes mixed
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y)), y, groups


def _folds_of(dataset, config, **how):
    from traineval.assembly.cross_validation import Folds
    from traineval.modes import resolve_mode

    mode = resolve_mode("supervised", config)
    request = Folds(Evaluator(), lambda: nn.Linear(4, 3), dataset, config, None, None, mode)
    return request.split(3, how.get("stratify"), how.get("groups"))


@pytest.mark.parametrize("stratify", [True, None])
def test_grouped_folds_of_a_classification_are_stratified_too(tmp_path, stratify):
    """stratify=True with groups gave GroupKFold's folds: validation classes [26, 9, 15],
    [12, 23, 15], [12, 18, 20] where StratifiedGroupKFold gives [17, 17, 17], ..."""
    from sklearn.model_selection import StratifiedGroupKFold

    from traineval import TrainingConfig

    dataset, y, groups = _iris_with_patients()
    config = TrainingConfig(seed=42, output_dir=str(tmp_path), device="cpu")
    folds = _folds_of(dataset, config, stratify=stratify, groups=groups)
    reference = StratifiedGroupKFold(3, shuffle=True, random_state=42).split(y, y, groups)
    for (train, val), (train_sk, val_sk) in zip(folds, reference, strict=True):
        assert not set(groups[train]) & set(groups[val])  # no group spans two folds
        assert (
            np.bincount(y[val], minlength=3).tolist()
            == np.bincount(y[val_sk], minlength=3).tolist()
        )
        assert sorted(val) == sorted(val_sk)
        assert sorted(train) == sorted(train_sk)
    plain = _folds_of(dataset, config, stratify=False, groups=groups)  # GroupKFold's, as before
    for train, val in plain:
        assert not set(groups[train]) & set(groups[val])


def test_integer_targets_too_few_to_stratify_name_regression_as_a_way_out(tmp_path):
    """Diabetes targets as int64 beside a regressor were read as 214 classes; the error said
    "use fewer folds (or stratify=False)", which cannot help values to regress."""
    from sklearn.datasets import load_diabetes

    from traineval import TrainingConfig

    x, y = load_diabetes(return_X_y=True)
    dataset = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y.astype(int)))
    config = TrainingConfig(output_dir=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match=r"read as 214 classes .* pass task_type='regression'"):
        _folds_of(dataset, config)


@pytest.mark.parametrize("classes", [3, 1])
def test_a_model_that_squeezes_its_output_scores_a_last_batch_of_one(classes):
    """Its `(C,)` (or 0-d) output on a batch of one sample went to the loss as it was:
    torch's "Expected input batch_size (3) to match target batch_size (1)", or "a binary
    classifier with one logit takes labels 0 and 1" for a 3-class model."""

    class Squeezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, classes)

        def forward(self, x):
            return self.fc(x).squeeze()

    torch.manual_seed(0)
    model, x = Squeezing(), torch.randn(9, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]) % max(classes, 2)
    with torch.no_grad():
        scores = model.fc(x)
    if classes == 1:
        probabilities = torch.sigmoid(scores.reshape(-1)).double().numpy()
        probabilities = np.stack([1 - probabilities, probabilities], 1)
    else:
        probabilities = torch.softmax(scores.double(), 1).numpy()
    expected = {
        "accuracy": sk.accuracy_score(y, probabilities.argmax(1)),
        "log_loss": sk.log_loss(y, probabilities),
    }
    config = EvaluationConfig(classification_metrics=["accuracy", "log_loss"])
    for batch_size in (9, 4, 1):  # 9 rows in batches of 4: the last batch has one row
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        metrics = Evaluator(config).evaluate(model, loader, task_type="classification").metrics
        assert metrics == pytest.approx({"loss": expected["log_loss"], **expected}, abs=1e-6)


def test_a_class_score_of_plus_infinity_is_refused_as_nan_is():
    """[inf, 0] (an fp16 overflow) gave a silent log_loss of NaN: its softmax is NaN, which
    the NaN check (on the row's maximum, inf) missed; with roc_auc the error blamed NaN in
    the input. One binary logit of +inf is a probability of 1, and stays scored."""
    inf = float("inf")
    logits = torch.tensor([[inf, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert torch.softmax(logits, 1)[0].isnan().any()
    targets = torch.tensor([0, 1, 1])
    for names in (("accuracy", "log_loss"), ("accuracy", "roc_auc")):
        evaluator = Evaluator(EvaluationConfig(classification_metrics=names))
        with pytest.raises(ValueError, match=r"1 predictions contain NaN \(or \+inf among"):
            evaluator.compute_metrics(logits, targets)
    logit, labels = torch.tensor([inf, -1.0, 2.0]), torch.tensor([1, 0, 0])
    binary = Evaluator().compute_metrics(logit, labels, task_type="classification")
    probability = torch.sigmoid(logit).double().numpy()
    expected = sk.log_loss(labels.numpy(), np.stack([1 - probability, probability], 1))
    assert binary["log_loss"] == pytest.approx(expected, abs=1e-6)
    assert binary["accuracy"] == sk.accuracy_score(labels, probability > 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_regression_predictions_files_keep_every_digit(tmp_path, dtype):
    """Values were written to 6 significant digits after a cast to float32: a price of
    1234567 read back 1234570 (1.23457e+06), and the MAE from the file (15.75) was not the
    reported one (15.5)."""
    import csv

    prices = torch.tensor([1234567.0, 2345678.0, 987654.0, 3456789.0], dtype=dtype)
    predicted = prices + torch.tensor([12.0, -40.0, 3.0, 7.0], dtype=dtype)
    config = EvaluationConfig(save_predictions=True)
    loader = DataLoader(TensorDataset(torch.arange(4), prices), batch_size=3)
    report = Evaluator(config).evaluate(Fixed(predicted), loader, output_dir=tmp_path)
    with open(report.files["predictions"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["target"]) for row in rows] == prices.tolist()
    assert [float(row["prediction"]) for row in rows] == predicted.tolist()
    from_file = [abs(float(r["target"]) - float(r["prediction"])) for r in rows]
    expected = sk.mean_absolute_error(prices.numpy(), predicted.numpy())
    assert np.mean(from_file) == report.metrics["mae"] == expected == 15.5


def test_the_confusion_matrix_plot_names_the_classes(tmp_path, monkeypatch):
    """per_class rows used class_names; the confusion-matrix PNG's axes were 0, 1, 2."""
    from traineval import EvaluationOptions
    from traineval.reporting import plots

    if plots.unavailable():
        pytest.skip("matplotlib is not installed")
    drawn = []
    original = plots.confusion_matrix

    def spy(matrix, path, class_names=None):
        drawn.append((matrix.tolist(), list(class_names or [])))
        return original(matrix, path, class_names)

    monkeypatch.setattr(plots, "confusion_matrix", spy)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=generator), torch.randint(0, 3, (30,), generator=generator)
    names = ["setosa", "versicolor", "virginica"]
    config = EvaluationConfig(plot_metrics=True)
    options = EvaluationOptions(class_names=names)
    report = Evaluator(config).evaluate(nn.Identity(), [(x, y)], options, output_dir=tmp_path)
    expected = sk.confusion_matrix(y.numpy(), x.argmax(1).numpy(), labels=range(3)).tolist()
    assert drawn == [(expected, names)]
    assert [row["label"] for row in report.per_class] == names


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_outputs_of_a_final_sigmoid_are_said(task, monkeypatch, caplog):
    """A binary or multi-label model ending in a sigmoid is read as logits (its sigmoid
    taken again: a perfect model scored 0.465 accuracy) without a word. Such outputs cannot
    be told from logits for sure, so they are said, once, not re-read."""
    from traineval.evaluation import metrics

    monkeypatch.setattr(metrics, "_SIGMOID_SAID", [False])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    width = 1 if task == "binary" else 3
    y = (x[:, :width] > 0).long().reshape(-1) if task == "binary" else (x[:, :3] > 0).float()
    logits = nn.Linear(4, width)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    kind = "classification" if task == "binary" else "multilabel"
    with caplog.at_level("WARNING"):
        Evaluator().evaluate(logits, loader, task_type=kind)
        zeros = nn.Linear(4, width)
        nn.init.zeros_(zeros.weight)
        nn.init.zeros_(zeros.bias)  # a zero-initialised head: all 0, in [0, 1]
        Evaluator().evaluate(zeros, loader, task_type=kind)
        assert "as a final sigmoid's do" not in caplog.text  # logits: nothing to say
        with torch.no_grad():
            logits.weight.mul_(20)  # trained: its sigmoid spreads over [0, 1]
        Evaluator().evaluate(nn.Sequential(logits, nn.Sigmoid()), loader, task_type=kind)
    assert caplog.text.count("as a final sigmoid's do") == 1


def test_one_regression_sample_scores_as_scikit_learn_and_its_interval_agrees():
    """R² of one sample is undefined (NaN) but its bootstrap interval read [0, 0]; explained
    variance read NaN where scikit-learn gives 1.0."""
    import math
    import warnings

    evaluator = Evaluator(EvaluationConfig(
        regression_metrics=("mse", "r2_score", "explained_variance"), bootstrap_samples=50
    ))  # fmt: skip
    report = evaluator.score(torch.tensor([1.0]), torch.tensor([2.0]), "regression")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that R² is undefined
        assert math.isnan(sk.r2_score([2.0], [1.0]))
    assert math.isnan(report.metrics["r2_score"])
    assert all(math.isnan(end) for end in report.intervals["r2_score"])
    expected = sk.explained_variance_score([2.0], [1.0])
    assert report.metrics["explained_variance"] == expected == 1.0
    assert report.intervals["explained_variance"] == (1.0, 1.0)


def test_counts_whose_first_batch_holds_only_0_and_1_are_told_how_to_be_regressed():
    """The first batch decides the task: integer counts sorted so that it holds only 0 and
    1 read as a binary classifier's labels, and the later batches failed; the error now
    says why and what to pass."""
    counts = torch.tensor([0, 1, 0, 1, 3, 5, 2, 4])
    loader = DataLoader(TensorDataset(counts[:, None].float(), counts), batch_size=4)
    with pytest.raises(ValueError, match=r"pass task_type='regression' for values to regress"):
        Evaluator().evaluate(nn.Identity(), loader)
    regressed = Evaluator().evaluate(nn.Identity(), loader, task_type="regression")
    assert regressed.metrics["mse"] == 0.0
