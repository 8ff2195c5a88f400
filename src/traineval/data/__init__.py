"""Data: datasets that packages ship, CSV tables, seeded splits, few-shot episodes."""

from .episodes import Episodes
from .splits import DataSplits, dataset_labels, hide_labels, make_splits, oversample_labeled
from .tables import BUILTIN_DATASETS, Table, load_builtin, load_csv

__all__ = [
    "BUILTIN_DATASETS",
    "DataSplits",
    "Episodes",
    "Table",
    "dataset_labels",
    "hide_labels",
    "load_builtin",
    "load_csv",
    "make_splits",
    "oversample_labeled",
]
