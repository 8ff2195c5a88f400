"""Bootstrap confidence intervals for evaluation metrics.

Resample the evaluated samples with replacement `Bootstrap.samples` times, compute each
metric on every resample exactly as scikit-learn would on it, and take the percentile
interval at `Bootstrap.level` (np.percentile, linear). The samples are first put in a
canonical order (sorted by target, then prediction), so an interval depends on the
evaluated pairs alone, not on the order they came in: the same with a shuffled loader or
under torchrun (whose ranks' shares arrive rank by rank). Resample r then uses row r of
`rng.integers(0, n, (samples, n))` from `np.random.default_rng(Bootstrap.seed)`, drawn in
chunks of rows (the same stream), so an interval is reproducible and can be checked against
a per-resample loop.

Classification: accuracy, precision, recall, F1 (weighted, macro over the classes present
in the resample's targets or predictions, or micro), from one confusion matrix per
resample. Regression: MSE, MAE, RMSE, R² (scikit-learn's finite value for a constant
target) and explained variance, averaged uniformly over outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from ..config.checks import fail, integer, number
from ..config.training_config import MAX_SEED

# Index rows drawn at once: about 2**22 sampled indices (tens of MB per array) a chunk.
CHUNK_ITEMS = 1 << 22


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `samples` resamples, the `level` of the interval (in (0, 1))
    and the `seed` of the resampling (`EvaluationConfig`'s `bootstrap_samples`,
    `confidence_level` and `bootstrap_seed`). A bad value is refused on construction."""

    samples: int
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a bad value, naming the field, the value and what is allowed."""
        integer("samples", self.samples, minimum=1)
        number("level", self.level, minimum=0.0, strict=True)
        if self.level >= 1.0:
            fail("level", self.level, "expected a number in (0, 1)")
        integer("seed", self.seed, minimum=0, maximum=MAX_SEED)


def _resamples(n: int, bootstrap: Bootstrap) -> Iterator[np.ndarray]:
    """The resamples' index rows (`bootstrap.samples` rows of `n`), a chunk of rows at a time."""
    rng = np.random.default_rng(bootstrap.seed)
    rows = max(1, CHUNK_ITEMS // max(n, 1))
    for start in range(0, bootstrap.samples, rows):
        yield rng.integers(0, n, size=(min(rows, bootstrap.samples - start), n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of `values` at `level`."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def classification_intervals(
    truth: np.ndarray,
    predicted: np.ndarray,
    num_classes: int,
    average: str,
    bootstrap: Bootstrap,
) -> dict[str, tuple[float, float]]:
    """Intervals of accuracy, precision, recall and F1 for integer labels in [0, C), averaged
    as `average` says ("weighted", "macro" or "micro")."""
    c = num_classes
    n = len(truth)
    cells = np.sort(truth.astype(np.int64) * c + predicted.astype(np.int64))  # canonical order
    values: dict[str, list[np.ndarray]] = {"accuracy": [], "precision": [], "recall": [], "f1": []}
    for index in _resamples(n, bootstrap):
        rows = index.shape[0]
        offset = np.arange(rows, dtype=np.int64)[:, None] * (c * c)
        counts = np.bincount((cells[index] + offset).ravel(), minlength=rows * c * c)
        matrix = counts.reshape(rows, c, c).astype(np.float64)
        tp = matrix[:, np.arange(c), np.arange(c)]
        support, chosen = matrix.sum(axis=2), matrix.sum(axis=1)
        accuracy = tp.sum(axis=1) / n
        values["accuracy"].append(accuracy)
        if average == "micro":
            for name in ("precision", "recall", "f1"):
                values[name].append(accuracy)
            continue
        precision, recall = _ratio(tp, chosen), _ratio(tp, support)
        f1 = _ratio(2 * tp, chosen + support)
        if average == "weighted":
            weights = support / support.sum(axis=1, keepdims=True)
        else:
            present = ((support + chosen) > 0).astype(np.float64)
            weights = present / present.sum(axis=1, keepdims=True)
        values["precision"].append((precision * weights).sum(axis=1))
        values["recall"].append((recall * weights).sum(axis=1))
        values["f1"].append((f1 * weights).sum(axis=1))
    return {
        name: _interval(np.concatenate(parts), bootstrap.level) for name, parts in values.items()
    }


def regression_intervals(
    predictions: np.ndarray, targets: np.ndarray, bootstrap: Bootstrap
) -> dict[str, tuple[float, float]]:
    """Intervals of MSE, MAE, RMSE, R² and explained variance for (N, K) arrays; a target
    that is not finite is left out of its output's scores, as in `RegressionStats`."""
    p = predictions.reshape(len(predictions), -1).astype(np.float64)
    y = targets.reshape(len(targets), -1).astype(np.float64)
    order = np.lexsort(np.concatenate([y, p], axis=1).T[::-1])  # canonical: by y, then p
    kept = np.isfinite(y[order])
    y, errors = np.where(kept, y[order], 0.0), np.where(kept, y[order] - p[order], 0.0)
    names = ("mse", "mae", "rmse", "r2_score", "explained_variance")
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for index in _resamples(len(y), bootstrap):
        weights, drawn = kept[index].astype(np.float64), errors[index]  # (rows, n, K)
        count = weights.sum(axis=1)
        none = np.where(count > 0, 0.0, np.nan)  # an output without a finite target: NaN
        squares = (drawn**2).sum(axis=1)
        mse = _ratio(squares, count) + none
        values["mse"].append(mse.mean(axis=1))
        values["mae"].append((_ratio(np.abs(drawn).sum(axis=1), count) + none).mean(1))
        values["rmse"].append(np.sqrt(mse).mean(axis=1))
        total = _spread(y[index], weights, count)
        r2 = np.where(count > 1, _score(squares, total), np.nan)
        values["r2_score"].append(r2.mean(axis=1))  # (NaN for one sample, as R²'s)
        explained = _score(_spread(drawn, weights, count), total)
        values["explained_variance"].append((explained + none).mean(axis=1))
    return {
        name: _interval(np.concatenate(parts), bootstrap.level) for name, parts in values.items()
    }


def _spread(values: np.ndarray, weights: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Each resample's sum of squared deviations from its mean, over the weighted rows."""
    mean = _ratio((values * weights).sum(axis=1), count)[:, None, :]
    return (weights * (values - mean) ** 2).sum(axis=1)


def _score(residual: np.ndarray, total: np.ndarray) -> np.ndarray:
    """1 - residual / total, with scikit-learn's finite values where total is 0."""
    finite = np.where(residual == 0, 1.0, 0.0)
    return np.where(total > 0, 1 - _ratio(residual, total), finite)


def function_intervals(
    fn: Callable[[np.ndarray, np.ndarray], float],
    truth: np.ndarray,
    predicted: np.ndarray,
    bootstrap: Bootstrap,
) -> tuple[float, float]:
    """The interval of a scikit-learn-shaped `fn(y_true, y_pred)`, called on every resample
    of the pairs (in the canonical order, as above). A resample it cannot score (a ValueError,
    e.g. one class only for a ranking metric) or scores as NaN is left out."""
    t, p = truth.reshape(len(truth), -1), predicted.reshape(len(predicted), -1)
    order = np.lexsort(np.concatenate([t, p], axis=1).T[::-1])
    truth, predicted = truth[order], predicted[order]
    values: list[float] = []
    for index in _resamples(len(truth), bootstrap):
        for rows in index:
            try:
                values.append(float(fn(truth[rows], predicted[rows])))
            except ValueError:
                continue
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    return _interval(finite, bootstrap.level) if finite.size else (float("nan"), float("nan"))
