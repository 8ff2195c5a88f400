"""Tabular data as arrays: scikit-learn's shipped datasets and CSV files."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from ..config.training_config import TaskType
from ..system.untrusted_text import read_utf8

logger = logging.getLogger(__name__)
# more whole-number classes than this in one target column: said, as they may be values
MANY_CLASSES = 50

BUILTIN_DATASETS = {
    "digits": ("load_digits", TaskType.CLASSIFICATION, (1, 8, 8)),
    "iris": ("load_iris", TaskType.CLASSIFICATION, None),
    "wine": ("load_wine", TaskType.CLASSIFICATION, None),
    "breast_cancer": ("load_breast_cancer", TaskType.CLASSIFICATION, None),
    "diabetes": ("load_diabetes", TaskType.REGRESSION, None),
}


@dataclasses.dataclass
class Table:
    """Features `x` (N, D) float32, targets `y` (int64 labels or float32 values), and the task.

    `ids`: each row's id, written into predictions files so they join back to the source (a
    CSV's id column, else its line number; a shipped dataset's row number)."""

    x: np.ndarray
    y: np.ndarray
    task_type: TaskType
    feature_names: list[str]
    class_names: list[str] | None = None
    image_shape: tuple[int, ...] | None = None
    ids: list[str] | None = None
    # text columns to encode (`Columns.categorical`): names, and each row's values (N, K)
    categorical_names: list[str] = dataclasses.field(default_factory=list)
    categorical: np.ndarray | None = None

    @property
    def num_outputs(self) -> int:
        if self.task_type is TaskType.CLASSIFICATION:
            return int(self.y.max()) + 1
        return 1 if self.y.ndim == 1 else int(self.y.shape[1])


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which columns of a CSV are features: `features` (all others left out), or every
    column but the targets, `exclude` and the `id_column` (copied into predictions)."""

    features: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    id_column: str | None = None
    categorical: tuple[str, ...] = ()  # text columns, one-hot encoded on the training split

    def pick(self, header: list[str], targets: list[str], path: Path) -> list[int]:
        """The feature columns' positions; a named column that is not there is an error."""
        named = [
            *(self.features or ()),
            *self.exclude,
            *([self.id_column] if self.id_column else []),
        ]
        named += [name for name in self.categorical if name not in named]
        missing = [name for name in named if name not in header]
        if missing:
            raise ValueError(
                f"data: {', '.join(map(repr, missing))} is not a column of {str(path)!r}; "
                f"columns: {', '.join(header)}"
            )
        taken = {*targets, *self.exclude, *([self.id_column] if self.id_column else [])}
        clash = [name for name in self.categorical if name in taken]
        if clash:
            raise ValueError(
                f"data.categorical names {clash}, which are the target, excluded or the id "
                "column: a categorical feature is none of those"
            )
        taken |= set(self.categorical)
        if self.features is not None:
            clash = [name for name in self.features if name in taken]
            if clash:
                raise ValueError(
                    f"data.features names {clash}, which are the target, excluded, the id or "
                    "categorical columns: data.features are the numeric features"
                )
            return [header.index(name) for name in self.features]
        return [i for i, name in enumerate(header) if name not in taken]


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
        ids=[str(i) for i in range(len(y))],  # the dataset's row numbers
    )


def load_csv(
    path: str | Path,
    target: str | Sequence[str],
    task: str = "auto",
    columns: Columns | None = None,
) -> Table:
    """Load a CSV file with a header row; `target` names the column to predict, or a list
    of columns (several outputs); `columns` chooses the features and the id column.

    Every feature column must be numeric. With `task="auto"`, one target column with
    non-numeric or integer values is a classification label, anything else a regression
    value; several target columns holding only 0 and 1 are multi-label indicators (one
    column per label), other numbers regression outputs.
    """
    path = Path(path)
    targets = [target] if isinstance(target, str) else list(target)
    header, body, lines = read_rows(path, f"data.path={str(path)!r}")
    missing = [name for name in targets if name not in header]
    if missing:
        named = f"data.target={target!r}" if isinstance(target, str) else f"data.target={targets}"
        raise ValueError(
            f"{named}: {', '.join(map(repr, missing))} is not a column of {str(path)!r}; "
            f"columns: {', '.join(header)}{separators_hint(header)}"
        )
    chosen = columns or Columns()
    target_at = [header.index(name) for name in targets]
    kept = chosen.pick(header, targets, path)
    features = [header[i] for i in kept]
    _refuse_unusable_features(features, chosen, path)
    x = np.empty((len(body), len(features)), dtype=np.float32)
    for k, (r, row) in enumerate(zip(lines, body, strict=True)):
        x[k] = [_feature_cell(row[i], path, r, header[i]) for i in kept]
    if len(target_at) == 1:
        cells = [row[target_at[0]] for row in body]
        table = _with_target(x, cells, features, task, (path, lines))
    else:
        raw = [[row[c] for c in target_at] for row in body]
        table = _with_targets(x, raw, targets, features, task, path)
    if chosen.categorical:
        at = [header.index(name) for name in chosen.categorical]
        table.categorical_names = list(chosen.categorical)
        table.categorical = np.array([[row[i].strip() for i in at] for row in body], dtype=object)
    if chosen.id_column is not None:
        table.ids = [row[header.index(chosen.id_column)] for row in body]
    else:
        table.ids = [str(line) for line in lines]  # the CSV's line numbers
    return table


def _feature_cell(value: str, path: Path, line: int, column: str) -> float:
    """A feature cell as a finite number; text that is a value, not a gap (an id, a
    category), gets the ways to say what the column is."""
    try:
        return finite_cell(value, path, line, column)
    except ValueError as error:
        if not value.strip() or value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
            raise
        try:
            read_number(value)
        except ValueError:
            raise ValueError(
                f"{path}:{line}: column {column!r} is {value!r}, not a number: a feature column "
                f"holds numbers. Encode it (data.categorical: [{column}]), leave it out "
                f"(data.exclude: [{column}]), make it the row id written into predictions "
                f"(data.id_column: {column}), or name the feature columns (data.features)"
            ) from None
        raise error


FLOAT32_MAX = 3.4028234663852886e38


# A number as a table writes it: ASCII digits, a point, an exponent (Python's float() also
# reads "5_1" as 51 and Arabic-Indic digits: a typo would become a wrong value unsaid)
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)",
    re.ASCII | re.IGNORECASE,
)


def read_number(value: str) -> float:
    """A cell's number, as a table writes one (pandas' reading too); a ValueError for
    anything else ("5_1", non-ASCII digits, "0x10")."""
    if not _NUMBER.fullmatch(value.strip()):  # (strip: any space, a no-break one too)
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def finite_cell(value: str, path: Path, line: int, column: str) -> float:
    """A CSV cell as a finite number; a missing, NaN, infinite or non-numeric cell is an
    error naming the file, line and column (traineval does not impute: fill or drop it)."""
    try:
        number = read_number(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        shown = "empty" if not value.strip() else repr(value)
        raise ValueError(
            f"{path}:{line}: column {column!r} is {shown}, not a finite number; fill it or "
            "drop the row (traineval does not impute missing values)"
        )
    if abs(number) > FLOAT32_MAX:  # the model reads float32: it would be inf
        raise ValueError(
            f"{path}:{line}: column {column!r} is {value.strip()!r}, beyond float32's range "
            f"(+-{FLOAT32_MAX:.4g}), which the model reads: rescale the column"
        )
    return number


def _refuse_unusable_features(features: list[str], chosen: Columns, path: Path) -> None:
    """A column without a name (pandas' `to_csv` writes its index so: row numbers, which
    leak the label of a sorted table) is not taken as a feature unsaid; nor does a table
    without features train."""
    if "" in features:
        first = features.index("") == 0
        why = (
            "pandas writes its index so: to_csv(..., index=False)"
            if first
            else "a comma at the end of the header row makes one so"
        )
        raise ValueError(
            f"data.path={str(path)!r}: column {features.index('') + 1} of the features has no "
            f"name in the header row ({why}); name it, or list the features in data.features"
        )
    if not features and not chosen.categorical:
        raise ValueError(
            f"data.path={str(path)!r}: no feature columns are left (the target, data.exclude "
            "and the id column take every column); a model needs at least one feature"
        )


def separators_hint(header: list[str]) -> str:
    """What to say of a header read as one column that holds tabs or semicolons: the file
    is separated by them, not by commas."""
    if len(header) != 1:
        return ""
    for separator, name in (("\t", "tab"), (";", "semicolon")):
        if separator in header[0]:
            return (
                f" (the header is one column holding {name}s: the file is {name}-separated, "
                f"and tables are read comma-separated; convert it: pandas.read_csv(path, "
                f"sep={separator!r}).to_csv(new_path, index=False))"
            )
    return ""


def read_rows(path: Path, named: str) -> tuple[list[str], list[list[str]], list[int]]:
    """A CSV file's header, data rows (every row as wide as the header) and each row's line
    number in the file (blank lines and cells that span lines counted); `named` is how
    errors name the file (e.g. "data.path='t.csv'")."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device or a pipe)"
        raise ValueError(f"{named} is {kind}: name a CSV file")
    if not path.is_file():
        where = (
            ""
            if path.is_absolute()
            else f" (a relative path is read from the working directory, {Path.cwd()})"
        )
        raise FileNotFoundError(f"{named} does not exist{where}")
    _refuse_other_formats(path, named)
    text = read_utf8(path, named.split("=")[0] if "=" in named else "CSV file")
    if not text.strip():
        raise ValueError(f"{named} is empty: a CSV file has a header row, then data rows")
    if _is_json(text):
        raise ValueError(
            f"{named} holds JSON, not CSV (it begins with {text.lstrip()[:1]!r}); write it as "
            "CSV, e.g. pandas.read_json(path).to_csv('table.csv', index=False)"
        )
    rows, lines = _csv_rows(text)
    if len(rows) < 2:
        raise ValueError(f"{named} has no data rows below its header")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    _refuse_duplicates(header, named)
    for r, row in zip(lines[1:], body, strict=True):
        if len(row) != len(header):
            raise ValueError(
                f"{path}:{r}: expected {len(header)} fields, got {len(row)}"
                + separators_hint(header)
            )
    return header, body, lines[1:]


def _is_json(text: str) -> bool:
    """Whether `text` is a JSON document or JSON lines (saved with a .csv name)."""
    if text.lstrip()[:1] not in ("{", "["):
        return False
    first = text.lstrip().split("\n", 1)[0]
    for candidate in (first, text):
        try:
            json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        return True
    return False


def _csv_rows(text: str) -> tuple[list[list[str]], list[int]]:
    """The non-blank rows of CSV `text` and the line each begins on. A cell may be as long
    as the text (read whole already: csv's own limit, 131,072 characters, refused a long
    text column with a bare 'field larger than field limit')."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines, previous = [], [], 0
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))
    try:
        for row in reader:
            first, previous = previous + 1, reader.line_num  # a quoted cell may span lines
            if row:  # blank lines
                rows.append(row)
                lines.append(first)
    finally:
        csv.field_size_limit(limit)
    return rows, lines


# the first bytes of files tables are often kept in, which are not CSV text
OTHER_FORMATS = {
    b"PAR1": ("a Parquet file", "pandas.read_parquet({path!r})"),
    b"PK\x03\x04": ("a zip archive (an Excel workbook, say)", "pandas.read_excel({path!r})"),
    b"\x1f\x8b": ("gzip-compressed", "pandas.read_csv({path!r})"),
    b"\x93NUMPY": ("a NumPy array file", "pandas.DataFrame(numpy.load({path!r}))"),
    b"\x89HDF": ("an HDF5 file", "pandas.read_hdf({path!r})"),
    b"ARROW1": ("an Arrow file", "pandas.read_feather({path!r})"),
}


def _refuse_other_formats(path: Path, named: str) -> None:
    """A table in another format than CSV text is named as that format, with the line
    that converts it (its bytes would be refused as "not UTF-8 text")."""
    with path.open("rb") as handle:
        start = handle.read(8)
    for magic, (what, reader) in OTHER_FORMATS.items():
        if start.startswith(magic):
            read = reader.format(path=str(path))
            csv_path = str(_converted_name(path))
            raise ValueError(
                f"{named} is {what}, not CSV text: tables are read from CSV files (convert "
                f"it, e.g. {read}.to_csv({csv_path!r}, index=False))"
            )


def _converted_name(path: Path) -> Path:
    """Where a table converted to CSV could go: beside it, `.csv` for its own suffix (or
    compression suffix), never its own name."""
    target = path.with_suffix("") if path.suffixes[-2:-1] == [".csv"] else path.with_suffix(".csv")
    return target if target != path else path.with_name(f"{path.stem}-text.csv")


def _refuse_duplicates(header: list[str], named: str) -> None:
    """Two columns of one name cannot both be read by name: refuse, naming them."""
    seen: dict[str, int] = {}
    for position, name in enumerate(header, start=1):
        if name in seen:
            raise ValueError(
                f"{named}: the column name {name!r} appears twice (columns {seen[name]} and "
                f"{position}): rename one, so that each column is read by its own name"
            )
        seen[name] = position


def _with_target(
    x: np.ndarray, raw: list[str], features: list[str], task: str, where: tuple[Path, list[int]]
) -> Table:
    """One target column's cells (`where`: the file and each row's line) as class labels
    or regression values."""
    path, lines = where
    if task not in ("auto", "classification", "regression"):
        raise ValueError(
            f"data.task={task!r} is invalid with one target column: expected 'auto', "
            "'classification' or 'regression' ('multilabel' takes a list of 0/1 columns)"
        )
    raw = [value.strip() for value in raw]  # "cat " is the class "cat"
    if "" in raw:
        line = lines[raw.index("")]
        raise ValueError(
            f"{path}:{line}: the target is empty; fill it or drop the row (traineval does not "
            "impute missing values)"
        )
    try:
        numbers = np.array([read_number(v) for v in raw], dtype=np.float64)
    except ValueError:
        numbers = None
    if task == "regression" or (task == "auto" and numbers is not None and not _integral(numbers)):
        if numbers is None:
            raise ValueError(f"data.task='regression' but {path} has non-numeric targets")
        bad = np.flatnonzero(~np.isfinite(numbers) | (np.abs(numbers) > FLOAT32_MAX))
        if bad.size:
            line = lines[int(bad[0])]
            raise ValueError(
                f"{path}:{line}: the target is {raw[bad[0]]!r}, not a finite number (in float32); "
                "fill it or drop the row (traineval does not impute missing values)"
            )
        return Table(x, numbers.astype(np.float32), TaskType.REGRESSION, features)
    if numbers is not None:
        raw = _numbered_classes(raw, numbers, where)
    labels = sorted(set(raw), key=lambda v: (Decimal(v), v) if numbers is not None else (0, v))
    if numbers is not None and task == "auto" and len(labels) > MANY_CLASSES:
        logger.warning(
            "%s: data.target holds whole numbers, read as %d classes; if they are values "
            "to regress, set data.task=regression",
            path,
            len(labels),
        )
    if len(labels) < 2:
        raise ValueError(
            f"{path}: every target is {labels[0]!r}: a classifier needs at least two classes "
            "(is data.target the right column?)"
        )
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[v] for v in raw], dtype=np.int64)
    return Table(x, y, TaskType.CLASSIFICATION, features, class_names=labels)


def _numbered_classes(raw: list[str], numbers: np.ndarray, where: Any) -> list[str]:
    """Numeric class labels as first written: `1`, `1.0` and `01` are one class, compared
    exactly (codes past 2^53 stay apart); NaN is no class."""
    path, lines = where
    if np.isnan(numbers).any():
        at = int(np.flatnonzero(np.isnan(numbers))[0])
        raise ValueError(
            f"{path}:{lines[at]}: the target is {raw[at]!r}, not a class; fill it or drop the "
            "row (traineval does not impute missing values)"
        )
    exact = [Decimal(text) for text in raw]
    first: dict[Decimal, str] = {}
    for value, text in zip(exact, raw, strict=True):
        first.setdefault(value, text)
    return [first[value] for value in exact]


def _with_targets(
    x: np.ndarray,
    raw: list[list[str]],
    targets: list[str],
    features: list[str],
    task: str,
    path: Path,
) -> Table:
    """Several target columns: multi-label indicators or regression outputs."""
    if task not in ("auto", "multilabel", "regression"):
        raise ValueError(
            f"data.task={task!r} is invalid with {len(targets)} target columns: expected "
            "'auto', 'multilabel' (0/1 columns, one per label) or 'regression'"
        )
    try:
        y = np.array(raw, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: the target columns {targets} must hold numbers") from None
    bad = np.argwhere(~np.isfinite(y) | (np.abs(y) > FLOAT32_MAX))
    if bad.size:
        row, column = (int(i) for i in bad[0])
        raise ValueError(
            f"{path}: data row {row + 1}, target column {targets[column]!r} is "
            f"{raw[row][column]!r}, not a finite float32 number; fill it or drop the row"
        )
    binary = bool(np.isin(y, (0.0, 1.0)).all())
    if task == "multilabel" and not binary:
        raise ValueError(f"data.task='multilabel' but {path}'s columns {targets} are not all 0/1")
    if task == "multilabel" or (task == "auto" and binary):
        return Table(x, y.astype(np.float32), TaskType.MULTILABEL, features, class_names=targets)
    return Table(x, y.astype(np.float32), TaskType.REGRESSION, features)


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
