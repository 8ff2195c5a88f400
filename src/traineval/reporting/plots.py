"""Evaluation plots as PNG files; matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..system.files import atomic_file

logger = logging.getLogger(__name__)


_warned: list[bool] = []


def unavailable() -> bool:
    """Whether figures cannot be drawn (no matplotlib); says so once, naming the extra."""
    try:
        _pyplot()
    except ImportError as error:
        if not _warned:
            _warned.append(True)
            logger.warning("%s; the numbers are written, the figures are not", error)
        return True
    return False


def optional(draw: Any, *args: Any, **kwargs: Any) -> Path | None:
    """`draw(*args, **kwargs)`, or None (with one warning) when matplotlib is not installed:
    the numbers are computed and written either way, only the figures need the extra."""
    if unavailable():
        return None
    return draw(*args, **kwargs)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'traineval[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(
    matrix: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None
) -> Path:
    """Counts with rows = true class, columns = predicted class, each cell annotated."""
    plt = _pyplot()
    n = matrix.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    size = min(12.0, 2.0 + 0.5 * n)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    if n <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                axes.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black",
                )
    return _save(figure, path)


def roc_curve(fpr: np.ndarray, tpr: np.ndarray, path: str | Path) -> Path:
    """The binary ROC curve with its area."""
    plt = _pyplot()
    from sklearn.metrics import auc

    area = float(auc(fpr, tpr))
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot(fpr, tpr, label=f"AUC = {area:.4f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    axes.legend(loc="lower right")
    return _save(figure, path)


def reliability_diagram(bins: dict[str, list[float]], path: str | Path) -> Path:
    """Accuracy against confidence per bin (`ProbabilityStats.reliability`), with the
    diagonal of perfect calibration; empty bins are left out."""
    plt = _pyplot()
    width = 1.0 / len(bins["upper_edge"])
    seen = [i for i, count in enumerate(bins["count"]) if count > 0]
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.bar(
        [bins["upper_edge"][i] - width / 2 for i in seen],
        [bins["accuracy"][i] for i in seen],
        width=width,
        edgecolor="black",
        label="accuracy",
    )
    axes.plot(
        [bins["confidence"][i] for i in seen],
        [bins["accuracy"][i] for i in seen],
        marker="o",
        color="tab:red",
        label="accuracy at mean confidence",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set(
        xlabel="confidence (top label's probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="reliability diagram",
    )
    axes.legend(loc="upper left")
    return _save(figure, path)


def learning_rate_search(search: Any, path: str | Path) -> Path:
    """A learning-rate range test (`LearningRateSearch`): loss against rate, log scale."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(search.learning_rates, search.losses, alpha=0.35, label="loss")
    axes.plot(search.learning_rates, search.smoothed_losses, label="smoothed")
    if search.suggestion is not None:
        axes.axvline(search.suggestion, color="tab:red", linestyle="--")
        axes.annotate(
            f"suggested {search.suggestion:.3g}",
            (search.suggestion, max(search.smoothed_losses)),
            color="tab:red",
        )
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    start = search.smoothed_losses[: max(1, len(search.smoothed_losses) // 10)]
    if start and min(start) > 0 and max(search.losses) > 2 * max(start):
        axes.set_ylim(top=2 * max(start))  # the exploding end would flatten everything else
    axes.legend(loc="lower left")
    return _save(figure, path)


def predicted_vs_actual(predictions: np.ndarray, targets: np.ndarray, path: str | Path) -> Path:
    """Scatter of predictions against targets, with the diagonal."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(targets, predictions, s=6, alpha=0.5)
    low = float(min(targets.min(), predictions.min()))
    high = float(max(targets.max(), predictions.max()))
    axes.plot([low, high], [low, high], linestyle="--", color="grey")
    axes.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual")
    return _save(figure, path)


def learning_curves(history: dict[str, list[Any]], path: str | Path, unit: str = "epoch") -> Path:
    """Train and validation loss per epoch (`unit`: "round" for a Flower run), and the
    validation metrics per evaluation."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history.get("epoch", [])
    left.plot(epochs, history.get("train_loss", []), marker="o", label="train loss")
    val_loss = [
        (e, v) for e, v in zip(epochs, history.get("val_loss", []), strict=False) if v is not None
    ]
    if val_loss:
        left.plot(*zip(*val_loss, strict=True), marker="o", label="val loss")
    left.set(xlabel=unit, ylabel="loss", title="Loss")
    left.legend()
    steps = history.get("val_steps", [])
    metrics = history.get("val_metrics", [])
    names = [n for n in (metrics[0] if metrics else {}) if n != "loss"]
    for name in names:
        right.plot(steps, [m.get(name) for m in metrics], marker=".", label=name)
    right.set(xlabel="optimizer step" if unit == "epoch" else unit, title="Validation metrics")
    if names:
        right.legend()
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    """`figure` as a PNG at `path`, written atomically (a symbolic link there is replaced,
    not written through), and closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        figure.tight_layout()
        with atomic_file(path) as temporary:
            figure.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(figure)
    return path
