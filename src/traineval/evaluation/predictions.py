"""predictions.csv: one row per sample, written batch by batch (nothing is held in memory)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from ..config.training_config import TaskType
from ..system.csv_cells import SafeWriter
from ..system.files import atomic_file
from .metrics import are_probabilities, class_probabilities


class PredictionWriter:
    """Stream `id, target, prediction[, prob_0 .. prob_{C-1}]` rows to a CSV file.

    Text cells that a spreadsheet would read as a formula (a class name such as `=1+1`) are
    written with a leading `'` (see `traineval.system.csv_cells`).

    `id` is the sample's id from `ids` (in the loader's order: a table's id column or row
    number; one a row, else `check_ids` refuses them), else its position in the loader's
    order. Classification rows carry the class probabilities (softmax, or sigmoid for one
    binary logit); multi-label rows the target and predicted label sets (joined by spaces, or
    by ';' or '|' where a label's name holds a space: `label_separator`; a label is predicted
    when its sigmoid probability exceeds `threshold`) and each label's probability. With
    `class_names` (one per class or label), classes are written by name and the columns are
    `prob_<name>`; regression rows one `target_j, prediction_j` pair per output; generation
    rows the per-sequence count of tokens whose target is not `ignore_index` and their
    accuracy.
    """

    def __init__(
        self,
        path: str | Path,
        task: TaskType,
        threshold: float = 0.5,
        class_names: list[str] | None = None,
        ids: list[str] | None = None,
        ignore_index: int = -100,
    ) -> None:
        self.path = Path(path)
        self.ids = ids
        self.ignore_index = ignore_index  # generation rows count the tokens not ignored
        self.task = task
        self.threshold = threshold
        self.class_names = class_names
        self._labels: list[str] = []  # how each class is written, set with the header
        self._separator = " "  # what a multi-label row's labels are joined by (ditto)
        self.rows = 0
        self._handle: IO[str] | None = None
        self._files = contextlib.ExitStack()
        self._given_probabilities = False  # (N, C) probabilities, read from the first batch
        self._writer: SafeWriter | None = None

    def __enter__(self) -> PredictionWriter:
        """Rows go to a temp file that replaces `path` once every row is written: an error
        midway (names refused at the header, say) leaves the earlier file as it was."""
        self._files = contextlib.ExitStack()
        temporary = self._files.enter_context(atomic_file(self.path))
        handle = temporary.open("w", newline="", encoding="utf-8")
        self._handle = self._files.enter_context(handle)
        self._writer = SafeWriter(self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._files.__exit__(kind, error, trace)

    def write(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        assert self._writer is not None, "use PredictionWriter as a context manager"
        if self.rows == 0:
            self._writer.writerow(self._header(outputs))
            classes = self.task is TaskType.CLASSIFICATION  # (in the outputs' own dtype)
            self._given_probabilities = classes and are_probabilities(outputs)
        outputs = outputs.detach().cpu()  # float64 kept; integer scores (logits) as floats
        outputs = outputs if outputs.dtype == torch.float64 else outputs.float()
        rows = self._rows(outputs, _widened(targets.detach().cpu()))
        self._writer.writerows(rows)

    def check_ids(self) -> None:
        """Refuse `ids` of another length than the rows written (called once every row is,
        inside the `with`: the file is then not written). Ids that do not fit are aligned
        with the loader's rows wrongly, and the file is meant to join back to the source
        rows by them (they were mixed with positions, or dropped, silently)."""
        if self.ids is not None and len(self.ids) != self.rows:
            raise ValueError(
                f"row_ids has {len(self.ids)} ids for the {self.rows} rows evaluated: give "
                "one id a row, in the loader's order"
            )

    def _header(self, outputs: torch.Tensor) -> list[str]:
        if self.task in (TaskType.MULTILABEL, TaskType.CLASSIFICATION):
            classes = outputs.shape[1] if outputs.ndim == 2 and outputs.shape[1] > 1 else 2
            self._labels = class_labels(self.class_names, classes)
            if self.task is TaskType.MULTILABEL:
                self._separator = label_separator(self._labels)
            return ["id", "target", "prediction", *(f"prob_{c}" for c in self._labels)]
        if self.task is TaskType.REGRESSION:
            width = outputs.reshape(outputs.shape[0], -1).shape[1]
            if width == 1:
                return ["id", "target", "prediction"]
            pairs = [[f"target_{j}", f"prediction_{j}"] for j in range(width)]
            return ["id", *(name for pair in pairs for name in pair)]
        return ["id", "tokens", "token_accuracy"]

    def _name(self, label: int) -> str | int:
        """How a class is written (an ignored target keeps its index)."""
        return self._labels[label] if 0 <= label < len(self._labels) else label

    def _rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[list[Any]]:
        start = self.rows
        if self.task is TaskType.MULTILABEL:
            probabilities = torch.sigmoid(outputs)
            chosen = (probabilities > self.threshold).tolist()
            rows = [
                [
                    start + i,
                    label_set(t, self._labels, self._separator),
                    label_set(p, self._labels, self._separator),
                    *probs,
                ]
                for i, (t, p, probs) in enumerate(
                    zip((targets == 1).tolist(), chosen, _probabilities(probabilities), strict=True)
                )
            ]
        elif self.task is TaskType.CLASSIFICATION:
            probabilities = (  # a model ending in a softmax: as they are
                outputs if self._given_probabilities else class_probabilities(outputs, detect=False)
            )
            predicted = probabilities.argmax(dim=1)
            rows = [
                [start + i, self._name(int(t)), self._name(int(p)), *probs]
                for i, (t, p, probs) in enumerate(
                    zip(
                        targets.reshape(-1).tolist(),
                        predicted.tolist(),
                        _probabilities(probabilities),
                        strict=True,
                    )
                )
            ]
        elif self.task is TaskType.REGRESSION:
            n = outputs.shape[0]
            predictions = value_texts(outputs.reshape(n, -1))
            truths = value_texts(targets.reshape(n, -1))
            rows = [
                [start + i, *(v for pair in zip(t, p, strict=True) for v in pair)]
                for i, (t, p) in enumerate(zip(truths, predictions, strict=True))
            ]
        else:
            kept = targets != self.ignore_index
            correct = ((outputs.argmax(-1) == targets) & kept).sum(-1)
            counts = kept.sum(-1)
            rows = [
                [start + i, int(c), repr(int(k) / int(c) if int(c) else float("nan"))]
                for i, (k, c) in enumerate(zip(correct.tolist(), counts.tolist(), strict=True))
            ]
        if self.ids is not None:
            for i, row in enumerate(rows, start=start):
                row[0] = self.ids[i] if i < len(self.ids) else i
        self.rows += len(rows)
        return rows


def class_labels(names: Sequence[str] | None, count: int) -> list[str]:
    """The classes' names (`class_names`: one a class, in class order, each once), or
    without them their indices (as text). Names that do not fit are refused, as
    scikit-learn's `classification_report` refuses them (they were dropped silently)."""
    if names is None:
        return [str(c) for c in range(count)]
    labels = [str(name) for name in names]
    if len(labels) != count:
        raise ValueError(
            f"class_names has {len(labels)} names ({_shown(labels)}) for the {count} classes "
            "the model scores: give one name a class, in class order"
        )
    twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
    if twice is not None:
        raise ValueError(f"class_names names {twice!r} twice: give each class its own name")
    return labels


def _shown(labels: list[str]) -> str:
    shown = ", ".join(repr(label) for label in labels[:5])
    return shown + (", ..." if len(labels) > 5 else "")


def _widened(values: torch.Tensor) -> torch.Tensor:
    """Targets as NumPy writes them: float64 and integers as they are, other floats (bf16,
    fp16, float32) as float32, booleans as 0 and 1."""
    if values.dtype == torch.bool:
        return values.long()
    return (
        values.float() if values.is_floating_point() and values.dtype != torch.float64 else values
    )


def _probabilities(values: torch.Tensor) -> list[list[str]]:
    """Probabilities to 6 significant digits (within 1e-6 of the value, rows summing to 1
    within 1e-6), as `traineval predict` writes them: the two files' cells are equal."""
    return [[f"{v:.6g}" for v in row] for row in values.tolist()]


def value_texts(values: torch.Tensor) -> list[list[str]]:
    """Each row's values as the shortest text that reads back as the same value in their
    dtype (0.1, not 0.10000000149011612; 1234567, not 1.23457e+06), integers as integers."""
    return values.numpy().astype(str).tolist()


SEPARATORS = (" ", ";", "|")


def label_separator(labels: Sequence[str]) -> str:
    """What a multi-label row's labels are joined by: a space, or where a label's name holds
    one (a table's column 'has cat') the first of ';' and '|' that no name holds, so that the
    cell splits back into the labels it names. Names holding all three are refused."""
    for separator in SEPARATORS:
        if not any(separator in label for label in labels):
            return separator
    held = next(label for label in labels if "|" in label)
    raise ValueError(
        f"the multi-label names hold a space, ';' and '|' (e.g. {held!r}): a row's label set "
        "could not be split back into its labels; rename the labels (class_names, or the "
        "table's target columns)"
    )


def label_set(indicators: list[bool], labels: list[str], separator: str = " ") -> str:
    """A multi-label row's set of labels, joined by `separator` (`label_separator`)."""
    return separator.join(labels[j] for j, on in enumerate(indicators) if on)
