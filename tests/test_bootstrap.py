"""Bootstrap intervals against a per-resample loop over scikit-learn's metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch.utils.data import DataLoader, TensorDataset

from traineval import EvaluationConfig, EvaluationOptions, Evaluator, TaskType
from traineval.evaluation.bootstrap import Bootstrap


def reference(n: int, samples: int, seed: int, metric, level: float = 0.95):
    """Resample r is row r of rng.integers(0, n, (samples, n)); percentile interval."""
    rows = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    values = np.array([metric(row) for row in rows])
    tail = (1 - level) / 2 * 100
    return tuple(np.percentile(values, [tail, 100 - tail]))


@pytest.mark.parametrize("average", ["weighted", "macro", "micro"])
def test_classification_intervals_equal_a_per_resample_sklearn_loop(average):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(240, 6, generator=generator)
    y = torch.randint(0, 5, (240,), generator=generator)
    y[y == 4] = torch.randint(0, 4, ((y == 4).sum().item(),), generator=generator)
    y[:2] = 4  # rare and never predicted: ~1 resample in 7 lacks it (macro: 4 classes)
    y[10:14] = -100  # ignored targets are not resampled
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    with torch.no_grad():
        model.bias[4] = -100.0
    config = EvaluationConfig(
        average=average, bootstrap_samples=200, bootstrap_seed=7, confidence_level=0.9
    )
    evaluator = Evaluator(config)
    report = evaluator.evaluate(
        model,
        DataLoader(TensorDataset(x, y), batch_size=32),
        EvaluationOptions(loss_function=torch.nn.CrossEntropyLoss()),
        task_type=TaskType.CLASSIFICATION,
    )
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).numpy()
    kept = y.numpy() != -100
    truth, predicted = y.numpy()[kept], predicted[kept]
    order = np.lexsort((predicted, truth))  # the documented canonical order
    truth, predicted = truth[order], predicted[order]
    n = len(truth)
    options = {"average": average, "zero_division": 0}
    expected = {
        "accuracy": reference(n, 200, 7, lambda r: sk.accuracy_score(truth[r], predicted[r]), 0.9),
        "precision": reference(
            n, 200, 7, lambda r: sk.precision_score(truth[r], predicted[r], **options), 0.9
        ),
        "recall": reference(
            n, 200, 7, lambda r: sk.recall_score(truth[r], predicted[r], **options), 0.9
        ),
        "f1": reference(n, 200, 7, lambda r: sk.f1_score(truth[r], predicted[r], **options), 0.9),
    }
    assert report.intervals.keys() == expected.keys()
    for name, (low, high) in expected.items():
        assert report.intervals[name] == pytest.approx((low, high), abs=1e-12), name


def test_regression_intervals_equal_a_per_resample_sklearn_loop():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(150, 4, generator=generator)
    y = x @ torch.randn(4, 2, generator=generator) + 0.3 * torch.randn(150, 2, generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = EvaluationConfig(
        regression_metrics=("mse", "mae", "rmse", "r2_score", "explained_variance"),
        bootstrap_samples=150,
        bootstrap_seed=3,
    )
    evaluator = Evaluator(config)
    report = evaluator.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=40))
    with torch.no_grad():
        p = model(x).double().numpy()
    t = y.double().numpy()
    order = np.lexsort(np.concatenate([t, p], axis=1).T[::-1])  # by target, then prediction
    p, t = p[order], t[order]

    def rmse(r):
        return np.mean(np.sqrt(sk.mean_squared_error(t[r], p[r], multioutput="raw_values")))

    metrics = {
        "mse": lambda r: sk.mean_squared_error(t[r], p[r]),
        "mae": lambda r: sk.mean_absolute_error(t[r], p[r]),
        "rmse": rmse,
        "r2_score": lambda r: sk.r2_score(t[r], p[r]),
        "explained_variance": lambda r: sk.explained_variance_score(t[r], p[r]),
    }
    for name, metric in metrics.items():
        low, high = reference(150, 150, 3, metric)
        assert report.intervals[name] == pytest.approx((low, high), rel=1e-9), name


def test_regression_intervals_with_missing_targets_equal_a_per_resample_sklearn_loop():
    """Targets that are NaN are left out of their output's scores in every resample, as
    scikit-learn scores each column with those rows dropped (averaged over outputs)."""
    from traineval.evaluation.bootstrap import regression_intervals

    rng = np.random.default_rng(4)
    t = rng.normal(size=(120, 2))
    p = t + 0.4 * rng.normal(size=(120, 2))
    t[rng.random((120, 2)) < 0.2] = np.nan
    got = regression_intervals(p, t, Bootstrap(100, seed=5))
    order = np.lexsort(np.concatenate([t, p], axis=1).T[::-1])  # by target, then prediction
    p, t = p[order], t[order]

    def per_column(fn):
        def metric(r):
            kept = [np.isfinite(t[r, j]) for j in range(2)]
            return np.mean([fn(t[r, j][kept[j]], p[r, j][kept[j]]) for j in range(2)])

        return metric

    metrics = {
        "mse": per_column(sk.mean_squared_error),
        "mae": per_column(sk.mean_absolute_error),
        "rmse": per_column(lambda a, b: np.sqrt(sk.mean_squared_error(a, b))),
        "r2_score": per_column(sk.r2_score),
        "explained_variance": per_column(sk.explained_variance_score),
    }
    for name, metric in metrics.items():
        assert got[name] == pytest.approx(reference(120, 100, 5, metric), rel=1e-9), name


def test_without_bootstrap_there_are_no_intervals_and_bad_settings_are_refused():
    evaluator = Evaluator()
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    report = evaluator.evaluate(torch.nn.Linear(3, 2), DataLoader(TensorDataset(x, y), 10))
    assert report.intervals == {}
    with pytest.raises(ValueError, match=r"confidence_level=1\.0 is invalid"):
        EvaluationConfig(confidence_level=1.0)
    with pytest.raises(ValueError, match="bootstrap_samples=-1 is invalid"):
        EvaluationConfig(bootstrap_samples=-1)


def test_a_constant_target_scores_r2_as_scikit_learn_does():
    from traineval.evaluation.bootstrap import regression_intervals

    targets = np.ones((30, 1))
    exact = regression_intervals(targets.copy(), targets, Bootstrap(20, level=0.9))
    assert exact["r2_score"] == (1.0, 1.0)
    off = regression_intervals(targets + 0.5, targets, Bootstrap(20, level=0.9))
    assert off["r2_score"] == (0.0, 0.0)
    assert off["mae"] == pytest.approx((0.5, 0.5))


def test_the_interval_does_not_depend_on_the_order_of_the_samples():
    from traineval.evaluation.bootstrap import classification_intervals, regression_intervals

    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 3, 90), rng.integers(0, 3, 90)
    shuffled = rng.permutation(90)
    bootstrap = Bootstrap(samples=100, level=0.95, seed=1)
    assert classification_intervals(truth, predicted, 3, "macro", bootstrap) == (
        classification_intervals(truth[shuffled], predicted[shuffled], 3, "macro", bootstrap)
    )
    y, p = rng.normal(size=(90, 2)), rng.normal(size=(90, 2))
    assert regression_intervals(p, y, bootstrap) == regression_intervals(
        p[shuffled], y[shuffled], bootstrap
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"samples": 0}, r"samples=0 is invalid: expected an integer >= 1"),
        ({"samples": 10, "level": 1.0}, r"level=1\.0 is invalid: expected a number in \(0, 1\)"),
        ({"samples": 10, "level": 0}, r"level=0 is invalid: expected a finite number > 0"),
        ({"samples": 10, "seed": -1}, r"seed=-1 is invalid: expected an integer >= 0"),
    ],
)
def test_bootstrap_settings_refuse_a_bad_value_by_name(given, message):
    with pytest.raises(ValueError, match=message):
        Bootstrap(**given)
