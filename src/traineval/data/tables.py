"""Tabular data as arrays: scikit-learn's shipped datasets and CSV files."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from ..config import TaskType

BUILTIN_DATASETS = {
    "digits": ("load_digits", TaskType.CLASSIFICATION, (1, 8, 8)),
    "iris": ("load_iris", TaskType.CLASSIFICATION, None),
    "wine": ("load_wine", TaskType.CLASSIFICATION, None),
    "breast_cancer": ("load_breast_cancer", TaskType.CLASSIFICATION, None),
    "diabetes": ("load_diabetes", TaskType.REGRESSION, None),
}


@dataclasses.dataclass
class Table:
    """Features `x` (N, D) float32, targets `y` (int64 labels or float32 values), and the task."""

    x: np.ndarray
    y: np.ndarray
    task_type: TaskType
    feature_names: list[str]
    class_names: list[str] | None = None
    image_shape: tuple[int, ...] | None = None

    @property
    def num_outputs(self) -> int:
        if self.task_type is TaskType.CLASSIFICATION:
            return int(self.y.max()) + 1
        return 1 if self.y.ndim == 1 else int(self.y.shape[1])


def load_builtin(name: str) -> Table:
    """Load one of scikit-learn's shipped datasets (no download)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"data.name={name!r} is invalid: expected one of "
            f"{', '.join(map(repr, BUILTIN_DATASETS))}, 'csv' or 'custom'"
        )
    import sklearn.datasets

    loader_name, task, image_shape = BUILTIN_DATASETS[name]
    bunch = getattr(sklearn.datasets, loader_name)()
    y = bunch.target.astype(np.int64 if task is TaskType.CLASSIFICATION else np.float32)
    classes = [str(c) for c in getattr(bunch, "target_names", [])] or None
    names = [str(n) for n in getattr(bunch, "feature_names", [])]
    return Table(
        x=bunch.data.astype(np.float32),
        y=y,
        task_type=task,
        feature_names=names or [f"x{i}" for i in range(bunch.data.shape[1])],
        class_names=classes if task is TaskType.CLASSIFICATION else None,
        image_shape=image_shape,
    )


def load_csv(path: str | Path, target: str, task: str = "auto") -> Table:
    """Load a CSV file with a header row; `target` names the column to predict.

    Every other column must be numeric. With `task="auto"`, a target with non-numeric or
    integer values is a classification label, anything else a regression value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise ValueError(f"data.path={str(path)!r} has no data rows below its header")
    header, body = rows[0], rows[1:]
    if target not in header:
        raise ValueError(
            f"data.target={target!r} is not a column of {str(path)!r}; columns: {', '.join(header)}"
        )
    t = header.index(target)
    features = [name for i, name in enumerate(header) if i != t]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{r}: expected {len(header)} fields, got {len(row)}")
        values = [v for i, v in enumerate(row) if i != t]
        try:
            x[r - 2] = [float(v) for v in values]
        except ValueError:
            raise ValueError(f"{path}:{r}: a feature value is not a number: {values}") from None
    raw = [row[t] for row in body]
    return _with_target(x, raw, features, task, path)


def _with_target(
    x: np.ndarray, raw: list[str], features: list[str], task: str, path: Path
) -> Table:
    if task not in ("auto", "classification", "regression"):
        raise ValueError(
            f"data.task={task!r} is invalid: expected 'auto', 'classification' or 'regression'"
        )
    try:
        numbers = np.array([float(v) for v in raw], dtype=np.float64)
    except ValueError:
        numbers = None
    if task == "regression" or (task == "auto" and numbers is not None and not _integral(numbers)):
        if numbers is None:
            raise ValueError(f"data.task='regression' but {path} has non-numeric targets")
        return Table(x, numbers.astype(np.float32), TaskType.REGRESSION, features)
    labels = sorted(set(raw), key=lambda v: (float(v), v) if numbers is not None else (0.0, v))
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[v] for v in raw], dtype=np.int64)
    return Table(x, y, TaskType.CLASSIFICATION, features, class_names=labels)


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
