"""Seeded train / validation / test splits, stratified for classification."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..config.training_config import TaskType
from .tables import MANY_CLASSES, Table


@dataclasses.dataclass
class DataSplits:
    """Train / val / test datasets plus what a model needs to know about one sample."""

    # Datasets (tables: TensorDatasets), or what a mode makes of them (few-shot tasks; for
    # reinforcement the environment factory: see `Mode.prepare`)
    train: Any
    val: Any
    test: Any
    input_shape: tuple[int, ...]
    num_outputs: int
    task_type: TaskType
    class_names: list[str] | None = None
    # Tables: how a raw row becomes a model input (`traineval predict` applies the same),
    # and which rows of the table each split holds.
    feature_names: list[str] | None = None
    feature_mean: np.ndarray | None = None  # None: not standardised
    feature_scale: np.ndarray | None = None
    indices: dict[str, np.ndarray] | None = None
    row_ids: list[str] | None = None  # each table row's id (`Table.ids`), by table row
    # text columns one-hot encoded after the numeric features: each one's categories as the
    # training split has them (`encode`); a category it lacks is none of them (all zeros)
    categories: dict[str, list[str]] | None = None
    # what a mode's `prepare` notes for its `model_options` (reinforcement: the action head)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # each split's rows as read (features, targets, categories, ids), hashed: a table whose
    # validation or test rows changed since training is another evaluation (`row_digests`)
    digests: dict[str, str] | None = None

    def ids_of(self, split: str) -> list[str] | None:
        """The ids of `split`'s rows in its order (predictions files join back by them);
        None where the split is not the table's rows as split (a mode reshaped it)."""
        dataset = getattr(self, split, None)
        if self.row_ids is None or self.indices is None or split not in self.indices:
            return None
        rows = self.indices[split]
        if not isinstance(dataset, TensorDataset) or len(dataset) != len(rows):
            return None
        return [self.row_ids[i] for i in rows]

    def schema(self) -> dict[str, Any]:
        """How a raw table row becomes a model input, and what the model predicts, as plain
        values (a run's `data.json`: `traineval predict` reads it, not the training data)."""

        def floats(values: np.ndarray | None) -> list[float] | None:
            return None if values is None else [float(v) for v in values]

        categories = self.categories or {}
        return {
            "feature_names": [str(n) for n in self.feature_names or []],
            "feature_mean": floats(self.feature_mean),
            "feature_scale": floats(self.feature_scale),
            "categories": {str(k): [str(v) for v in vs] for k, vs in categories.items()} or None,
            "class_names": None if self.class_names is None else [str(c) for c in self.class_names],
            "task_type": self.task_type.value,
            "input_shape": [int(n) for n in self.input_shape],
            "num_outputs": int(self.num_outputs),
            "split_digests": self.digests,
        }

    @classmethod
    def from_schema(cls, record: dict[str, Any]) -> DataSplits:
        """The splits' description from `schema()`, without their data (for predictions)."""

        def array(values: Any) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=np.float32)

        names = list(record["feature_names"])
        categories = record.get("categories") or None
        if categories is not None and not all(
            isinstance(vs, list) and all(isinstance(v, str) for v in vs)
            for vs in categories.values()
        ):
            raise ValueError("categories must map each column to a list of category names")
        encoded = sum(len(vs) for vs in (categories or {}).values())
        for key in ("feature_mean", "feature_scale"):
            values = record.get(key)
            if values is not None and len(values) != len(names) - encoded:
                raise ValueError(
                    f"{key} holds {len(values)} values for {len(names) - encoded} columns"
                )
            found = array(values)
            if found is not None and not (
                np.isfinite(found).all() and (key != "feature_scale" or (found > 0).all())
            ):
                wanted = "positive numbers" if key == "feature_scale" else "finite numbers"
                raise ValueError(f"{key} holds {found.tolist()!r}: expected {wanted}")
        if int(np.prod(record["input_shape"])) != len(names):
            raise ValueError(
                f"input_shape {record['input_shape']} does not hold {len(names)} features"
            )
        return cls(
            train=None,
            val=None,
            test=None,
            input_shape=tuple(record["input_shape"]),
            num_outputs=int(record["num_outputs"]),
            task_type=TaskType(record["task_type"]),
            class_names=record.get("class_names"),
            feature_names=names,
            feature_mean=array(record.get("feature_mean")),
            feature_scale=array(record.get("feature_scale")),
            categories=categories,
        )

    @property
    def numeric_names(self) -> list[str]:
        """The numeric feature columns (`feature_names` less the encoded categories)."""
        encoded = sum(len(c) for c in (self.categories or {}).values())
        names = self.feature_names or []
        return names[: len(names) - encoded]

    def encode(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Text columns (N, K), in `categories` order, one-hot; see `one_hot`."""
        return one_hot(self.categories or {}, raw)

    def prepare(self, x: np.ndarray, encoded: np.ndarray | None = None) -> torch.Tensor:
        """Raw feature rows (N, D), in `numeric_names` order, and the one-hot columns of
        the text ones (`encode`) when the table has categorical columns, as model inputs."""
        x = np.asarray(x, dtype=np.float32)  # the arithmetic of make_splits, to the bit
        if self.feature_mean is not None and self.feature_scale is not None:
            x = (x - self.feature_mean) / self.feature_scale
        if self.categories:
            assert encoded is not None, "a table with categorical columns needs them"
            x = np.concatenate([x, encoded], axis=1)
        features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return features.reshape(len(x), *self.input_shape)


def make_splits(
    table: Table,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    standardize: bool = True,
    image_shape: tuple[int, ...] | None = None,
) -> DataSplits:
    """Split rows with `seed` (stratified by class for classification) and build tensors.

    Standardization statistics come from the training rows only, so nothing of the
    validation or test rows leaks into training.
    """
    indices = _split_rows(table, val_fraction, test_fraction, seed)
    train_idx, val_idx, test_idx = indices
    x = table.x
    mean = scale = None
    if standardize:
        mean = x[train_idx].mean(axis=0)
        std = x[train_idx].std(axis=0)
        scale = np.where(std > 0, std, 1.0)
        x = (x - mean) / scale
    names, categories = list(table.feature_names), None
    if table.categorical is not None:  # learned on the training rows only, as the scaling
        categories = _categories(table, train_idx)
        x = np.concatenate([x, one_hot(categories, table.categorical)[0]], axis=1)
        names += [f"{name}={value}" for name, values in categories.items() for value in values]
    shape = tuple(image_shape or table.image_shape or (x.shape[1],))
    if int(np.prod(shape)) != x.shape[1]:
        raise ValueError(
            f"data.image_shape={list(shape)} holds {int(np.prod(shape))} values but samples "
            f"have {x.shape[1]} features"
        )

    def subset(idx: np.ndarray) -> TensorDataset | None:
        if len(idx) == 0:
            return None
        features = torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))
        return TensorDataset(features.reshape(len(idx), *shape), torch.from_numpy(table.y[idx]))

    train = subset(train_idx)
    assert train is not None
    return DataSplits(
        train=train,
        val=subset(val_idx),
        test=subset(test_idx),
        input_shape=shape,
        num_outputs=table.num_outputs,
        task_type=table.task_type,
        class_names=table.class_names,
        feature_names=names,
        feature_mean=mean,
        feature_scale=scale,
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
        row_ids=table.ids,
        categories=categories,
        digests={name: row_digest(table, idx) for name, idx in zip(SPLITS, indices, strict=True)},
    )


SPLITS = ("train", "val", "test")
SCHEMA_FILE = "data.json"  # a table run's `schema()`, beside its config.yaml


def row_digest(table: Table, idx: np.ndarray) -> str:
    """SHA-256 of the rows `idx` of `table` as read (before any scaling): their features,
    targets, text categories and ids, in order; equal exactly when the rows are."""
    digest = hashlib.sha256()
    for part in (table.x[idx], table.y[idx]):
        digest.update(np.ascontiguousarray(part).tobytes())
    texts = [] if table.categorical is None else table.categorical[idx].ravel().tolist()
    ids = [] if table.ids is None else [table.ids[i] for i in idx]
    digest.update("\x1f".join(map(str, [*texts, *ids])).encode())
    return digest.hexdigest()


def _split_rows(
    table: Table, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training, validation and test rows of `table` (stratified by class for
    classification), after checking the fractions leave rows to train on and every class
    can be stratified."""
    from sklearn.model_selection import train_test_split

    for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} is invalid: expected a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves "
            "no training data: expected a sum below 1"
        )
    classification = table.task_type is TaskType.CLASSIFICATION
    indices = np.arange(len(table.y))
    if classification:
        _check_stratifiable(table.y, test_fraction, ("data.test_fraction", test_fraction), table)
    rest, test_idx = _split(indices, table.y, test_fraction, seed, classification, train_test_split)
    val_share = val_fraction / (1.0 - test_fraction) if val_fraction else 0.0
    if classification:
        _check_stratifiable(table.y[rest], val_share, ("data.val_fraction", val_fraction), table)
    train_idx, val_idx = _split(
        rest, table.y[rest], val_share, seed, classification, train_test_split
    )
    return train_idx, val_idx, test_idx


def one_hot(categories: dict[str, list[str]], raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Text columns (N, K), in `categories` order, one-hot (scikit-learn's OneHotEncoder
    with those categories), and how many rows held a category not among them: encoded as
    none of them (all zeros)."""
    from sklearn.preprocessing import OneHotEncoder

    known = [list(values) for values in categories.values()]
    encoder = OneHotEncoder(
        categories=known, handle_unknown="ignore", sparse_output=False, dtype=np.float32
    )
    encoded = encoder.fit(raw).transform(raw)
    ends = np.cumsum([len(values) for values in known])
    unseen = np.zeros(len(raw), dtype=bool)
    for block in np.split(encoded, ends[:-1], axis=1):
        unseen |= block.sum(axis=1) == 0
    return encoded, int(unseen.sum())


def _categories(table: Table, rows: np.ndarray) -> dict[str, list[str]]:
    """Each categorical column's categories in the training rows (scikit-learn's
    OneHotEncoder learns them; sorted)."""
    from sklearn.preprocessing import OneHotEncoder

    assert table.categorical is not None
    encoder = OneHotEncoder(handle_unknown="ignore").fit(table.categorical[rows])
    return {
        name: [str(v) for v in values]
        for name, values in zip(table.categorical_names, encoder.categories_, strict=True)
    }


def _check_stratifiable(
    labels: np.ndarray, fraction: float, given: tuple[str, float], table: Table
) -> None:
    """Refuse a stratified split of `labels` that scikit-learn cannot make (a class of one
    row, or a side with fewer rows than classes), naming the label and the setting `given`
    as (field, value written); `fraction` is the share of `labels` it takes."""
    if fraction == 0.0 or len(labels) == 0:
        return
    field, written = given
    setting = f"{field}={written:g}"
    classes, counts = np.unique(labels, return_counts=True)
    names = table.class_names
    name = (lambda c: names[int(c)]) if names else (lambda c: c)
    rare = [f"{name(c)!r} ({n} row)" for c, n in zip(classes, counts, strict=True) if n < 2]
    if rare:
        raise ValueError(
            f"label {', '.join(rare[:5])} cannot be split: {setting} splits every class "
            "between two sets (stratified), which needs at least 2 rows of each; add rows of "
            f"it, drop it from the data, or set {field}=0{_values_hint(table)}"
        )
    held = math.ceil(fraction * len(labels))
    kept = len(labels) - held
    if min(held, kept) < len(classes):
        raise ValueError(
            f"{setting} gives {held} of {len(labels)} rows to one side and {kept} to the "
            f"other, fewer than the {len(classes)} classes each side must hold (stratified): "
            f"choose a fraction that leaves at least {len(classes)} rows on each side, or "
            f"0{_values_hint(table)}"
        )


def _values_hint(table: Table) -> str:
    """What to add where many classes are whole numbers: they may be values to regress
    (scikit-learn's diabetes target, 214 'classes')."""
    names = table.class_names or []
    try:
        numeric = all(float(name).is_integer() for name in names)
    except (ValueError, OverflowError):
        numeric = False
    if not numeric or len(names) <= MANY_CLASSES:
        return ""
    return (
        f" (the target's {len(names)} classes are whole numbers: if they are values to "
        "regress, set data.task=regression)"
    )


def _split(indices, labels, fraction, seed, stratify, splitter):
    if fraction == 0.0:
        return indices, indices[:0]
    strata = labels if stratify else None
    first, second = splitter(indices, test_size=fraction, random_state=seed, stratify=strata)
    return np.sort(first), np.sort(second)


def dataset_labels(dataset: Any) -> np.ndarray:
    """Each sample's target (the first value of a multi-valued one): a TensorDataset's second
    tensor, else read sample by sample. For stratification, partitions and episodes."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return np.asarray(tensors[1].reshape(len(tensors[1]), -1)[:, 0])
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def labeled_rows(labels: np.ndarray, labeled_fraction: float, seed: int) -> np.ndarray | None:
    """The rows whose labels `hide_labels` keeps, sorted (None: all of them)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    classes = len(np.unique(labels))
    keep = max(classes, round(labeled_fraction * len(labels)))
    if keep >= len(labels):
        return None
    kept, _ = train_test_split(indices, train_size=keep, random_state=seed, stratify=labels)
    return np.sort(kept)


def hide_labels(
    dataset: TensorDataset,
    labeled_fraction: float,
    unlabeled_label: int,
    seed: int,
    drop: bool = False,
) -> TensorDataset:
    """`dataset` with labels kept on `labeled_fraction` of the rows only.

    The kept rows are drawn with `seed`, stratified by class (at least one row per class);
    every other row's label becomes `unlabeled_label`, or with `drop` the row is left out.
    """
    x, y = dataset.tensors
    if y.is_floating_point():
        raise ValueError("data.labeled_fraction needs class labels (a classification dataset)")
    kept = labeled_rows(y.numpy(), labeled_fraction, seed)
    if kept is None:
        return dataset
    rows = torch.as_tensor(kept)
    if drop:
        return TensorDataset(x[rows], y[rows])
    hidden = torch.full_like(y, unlabeled_label)
    hidden[rows] = y[rows]
    return TensorDataset(x, hidden)


def oversample_labeled(
    dataset: Dataset[Any], *, share: float = 0.25, unlabeled_label: int = -1
) -> Subset[Any]:
    """`dataset` with its labeled rows repeated so that about `share` of the rows are
    labeled (each labeled row the same number of times, at least once; the unlabeled rows
    once each, after them).

    Semi-supervised batches drawn from a few labels among many unlabeled rows hold almost
    no labeled sample; FixMatch draws one labeled sample per seven unlabeled ones
    (share 0.125) and its benchmarks here use about one in four (0.25).

    Raises:
        ValueError: `share` outside (0, 1), or a dataset without labeled rows.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share={share!r} is invalid: expected a number in (0, 1)")
    labels = dataset_labels(dataset)
    labeled = np.flatnonzero(labels != unlabeled_label)
    unlabeled = np.flatnonzero(labels == unlabeled_label)
    if len(labeled) == 0:
        raise ValueError(
            f"oversample_labeled found no labeled rows (every label is {unlabeled_label})"
        )
    repeat = max(1, round(share * len(unlabeled) / ((1.0 - share) * len(labeled))))
    rows = np.concatenate([np.tile(labeled, repeat), unlabeled])
    return Subset(dataset, rows.tolist())
