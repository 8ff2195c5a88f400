"""`traineval predict`: a finished run's model on new rows of a CSV file.

The run's `config.yaml` says how its data was read: the input CSV must hold the training
table's feature columns (by name, in any order); they are standardised with the training
rows' statistics, as in training. Every other column (an id, or the target if present) is
copied to the output, followed by the prediction: the class by name and each class's
probability; each label's probability and the predicted label set (multi-label); the
value, or one per output (regression).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.checks import fail, integer, number
from ..config.code_references import untrusted
from ..config.training_config import TaskType
from ..data.splits import DataSplits
from ..data.tables import finite_cell, read_rows, separators_hint
from ..evaluation.metrics import class_probabilities
from ..evaluation.predictions import class_labels, label_separator, label_set, value_texts
from ..models import build_model
from ..runs.checkpoint import default_checkpoint, load_model_weights, run_checkpoint
from ..system.csv_cells import SafeWriter
from ..system.files import atomic_write_text, read_json_or_none
from ..training.batches import prediction_of
from ..training.precision import make_current, resolve_device
from .experiment import DATA_SCHEMA, RunConfig, check_cv_folder, load_data, recorded_in

# the built-in modes whose model does not map a table row to the task's outputs
ROWLESS_MODES = ("unsupervised", "reinforcement", "meta_learning")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PredictCsvOptions:
    """How `predict_csv` scores the rows: `checkpoint` (a name in the run's checkpoints/,
    "best", "last", "final" for a Flower run's final weights, or a path; None: the best,
    else the final weights), `batch_size` (rows per forward pass) and `threshold` (the
    multi-label cut, in (0, 1); None: the run's `evaluation.multilabel_threshold`). A bad
    value is refused on construction, naming the field."""

    checkpoint: str | None = None
    batch_size: int = 1024
    threshold: float | None = None

    def __post_init__(self) -> None:
        """Refuse a bad value, naming the field, the value and what is allowed."""
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            fail("checkpoint", self.checkpoint, "expected a checkpoint name or path, or None")
        integer("batch_size", self.batch_size, minimum=1)
        if self.threshold is not None:
            number("threshold", self.threshold, minimum=0.0, strict=True, below=1.0)


def predict_csv(
    run_dir: str | Path,
    input_csv: str | Path,
    options: PredictCsvOptions | None = None,
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
) -> tuple[Path, int]:
    """Write predictions for every row of `input_csv`; returns the output path and row count.

    `options` (`PredictCsvOptions`) picks the checkpoint (by default the best, else the
    final weights), the batch size and the multi-label threshold. `output` defaults to
    `<run_dir>/predictions/<input stem>-<6 hex digits of the input's path>.csv` (inputs of
    one name in different folders get different files). An `output` that is the input, or
    a file that exists (unless `overwrite`), is refused before any work; the file is
    written atomically. The input's other columns are copied after the predictions; a text
    cell a spreadsheet would read as a formula gets a leading `'`. A run whose config names
    code to import (a custom model factory) is refused unless `trust_code=True` (see
    `RunConfig.from_run_dir`).
    """
    how = options or PredictCsvOptions()
    run_dir, input_csv = Path(run_dir), Path(input_csv)
    out = output_path(run_dir, input_csv, output, overwrite)
    config = RunConfig.from_run_dir(run_dir, trust_code=trust_code)
    with untrusted(str(run_dir / "config.yaml"), trust_code=trust_code):
        return _predict(config, run_dir, input_csv, out, how)


def _refuse_non_finite(model: torch.nn.Module, path: Path) -> None:
    """A checkpoint whose weights hold NaN or inf predicts nothing worth writing."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"checkpoint {str(path)!r}: the model's {name!r} holds NaN or infinite values, "
                "so every prediction would be NaN; predict from another checkpoint (--checkpoint)"
            )


def output_path(run_dir: Path, input_csv: Path, output: str | Path | None, overwrite: bool) -> Path:
    """Where the predictions go (see `predict_csv`); refused when that would overwrite the
    input, or a file the user did not name for overwriting."""
    if output is None:
        digest = hashlib.sha1(str(input_csv.resolve()).encode()).hexdigest()[:6]
        return run_dir / "predictions" / f"{input_csv.stem}-{digest}.csv"
    out = Path(output)
    if out.resolve() == input_csv.resolve():
        raise ValueError(
            f"--output {str(out)!r} is the input file: the predictions would replace its rows; "
            "choose another path"
        )
    if out.is_dir() or str(output).endswith(("/", os.sep)):
        raise ValueError(f"--output {str(output)!r} is a directory: name a CSV file (in it)")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        what = "a symbolic link" if out.is_symlink() else "not a regular file (a device?)"
        raise ValueError(
            f"--output {str(out)!r} is {what}: predict writes a new file and renames it "
            "into place, which would replace it; name a regular file (the link's target)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--output {str(out)!r} exists: predict does not replace a file unless told to; "
            "choose another path, or pass --overwrite"
        )
    return out


@dataclasses.dataclass
class _Rows:
    """The input CSV as read: its header and rows, the columns copied to the output and the
    model's inputs made of the feature columns."""

    header: list[str]
    rows: list[list[str]]
    kept: list[int]
    inputs: torch.Tensor


def _predict(
    config: RunConfig, run_dir: Path, input_csv: Path, out: Path, how: PredictCsvOptions
) -> tuple[Path, int]:
    """Score every row of `input_csv` with the run's model (`how.checkpoint`, else its
    default) and write them with their prediction columns to `out`; returns it and the row
    count."""
    _refuse_unsupported(config)
    check_cv_folder(run_dir, "test", "predict with")  # a cross-validation's folder: use a fold
    splits = table_of(config, run_dir)
    table = _read_rows(splits, input_csv)
    cut = config.evaluation.multilabel_threshold if how.threshold is None else how.threshold
    written, _ = _columns(
        splits.task_type, torch.zeros(1, splits.num_outputs), splits.class_names, cut
    )
    clash = [table.header[i] for i in table.kept if table.header[i] in written]
    if clash:  # the output would hold two columns of one name (which traineval refuses)
        raise ValueError(
            f"{str(input_csv)!r} has the column(s) {clash}, which predict writes: rename or "
            "drop them (is it an earlier prediction's output?)"
        )
    checkpoint = run_checkpoint(run_dir, how.checkpoint or default_checkpoint(run_dir))
    model, device = _load_model(config, splits, checkpoint)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(table.inputs), how.batch_size):
            batch = table.inputs[start : start + how.batch_size].to(device)
            outputs.append(prediction_of(model(batch)).float().cpu())
    scores = torch.cat(outputs) if outputs else torch.empty(0, splits.num_outputs)
    names, values = _columns(splits.task_type, scores, splits.class_names, cut)
    text = io.StringIO(newline="")
    writer = SafeWriter(text)
    writer.writerow([table.header[i] for i in table.kept] + names)
    for row, predicted in zip(table.rows, values, strict=True):
        writer.writerow([row[i] for i in table.kept] + predicted)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text.getvalue())
    return out, len(table.rows)


def _refuse_unsupported(config: RunConfig) -> None:
    """Refuse a run whose model does not score table rows (its mode, or custom data)."""
    mode = config.mode
    if mode.name in ROWLESS_MODES or mode.reconstructs or not mode.uses_data:
        raise ValueError(
            f"traineval predict scores rows with a classifier or regressor; this run's mode "
            f"{mode.name!r} trains a model of another kind (supervised, semi_supervised, "
            "federated and a mode of your own that trains on the table's rows can predict)"
        )
    if config.data.name == "custom":
        raise ValueError(
            "traineval predict cannot rebuild the features of data.name='custom' (the factory "
            "owns its transform): load the checkpoint and call the model in Python"
        )


def _read_rows(splits: DataSplits, input_csv: Path) -> _Rows:
    """Read `input_csv` and turn its feature columns into model inputs as training did
    (standardised numbers, encoded categories); a missing feature column is refused."""
    header, rows, lines = read_rows(input_csv, repr(str(input_csv)))
    numeric, categorical = splits.numeric_names, list(splits.categories or {})
    trained_on = [*numeric, *categorical]
    missing = [name for name in trained_on if name not in header]
    if missing:
        folded = {name.casefold(): name for name in header}
        cased = [f"{folded[m.casefold()]!r} for {m!r}" for m in missing if m.casefold() in folded]
        hint = f"; names are read as written: {', '.join(cased[:3])}?" if cased else ""
        raise ValueError(
            f"{input_csv}: missing feature columns {missing} (the run was trained on "
            f"{len(trained_on)} columns: {', '.join(trained_on)}){hint}" + separators_hint(header)
        )
    columns = [header.index(name) for name in numeric]
    texts = [header.index(name) for name in categorical]
    kept = [i for i in range(len(header)) if i not in columns and i not in texts]
    x = np.empty((len(rows), len(columns)), dtype=np.float32)
    for r, (line, row) in enumerate(zip(lines, rows, strict=True)):
        x[r] = [finite_cell(row[c], input_csv, line, header[c]) for c in columns]
    raw = np.array([[row[c].strip() for c in texts] for row in rows], dtype=object)
    encoded = None
    if categorical:
        encoded, unseen = splits.encode(raw)  # once: the inputs and the count of unseen
        if unseen:
            logger.warning(
                "%d of %d rows hold a category of %s the training split does not have: "
                "encoded as none of the known ones",
                unseen, len(rows), ", ".join(categorical),
            )  # fmt: skip
    return _Rows(header, rows, kept, splits.prepare(x, encoded))


def _load_model(
    config: RunConfig, splits: DataSplits, path: Path
) -> tuple[torch.nn.Module, torch.device]:
    """The run's model with the checkpoint's weights (refused when not finite), in eval mode
    on the run's device; returns it and the device."""
    device = resolve_device(config.training.device)
    make_current(device)
    model = build_model(
        config.model.name,
        input_shape=splits.input_shape,
        output_dim=splits.num_outputs,
        options=dict(config.model.options),
    )
    load_model_weights(model, path, map_location="cpu")
    _refuse_non_finite(model, path)
    model.to(device).eval()
    return model, device


def table_of(config: RunConfig, run_dir: Path) -> DataSplits:
    """How the run turned rows into inputs: its `data.json` (the training split's scaling
    and categories, as training used them), else (runs of earlier versions) the training
    data split again."""
    path = recorded_in(run_dir) / DATA_SCHEMA
    schema = read_json_or_none(path)
    if schema is None and not path.exists():
        return load_data(config.data)
    try:
        return DataSplits.from_schema(schema)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{str(path)!r} does not describe the run's table ({type(error).__name__}: "
            f"{error}); copy it again from the run's folder"
        ) from None


def _columns(
    task: TaskType, scores: torch.Tensor, class_names: list[str] | None, threshold: float
) -> tuple[list[str], list[list[Any]]]:
    """The prediction columns' names and each row's values."""
    if task is TaskType.CLASSIFICATION:
        probabilities = class_probabilities(scores)
        labels = class_labels(class_names, probabilities.shape[1])
        chosen = probabilities.argmax(dim=1).tolist()
        values = [
            [labels[c], *(f"{p:.6g}" for p in probs)]
            for c, probs in zip(chosen, probabilities.tolist(), strict=True)
        ]
        return ["prediction", *(f"prob_{label}" for label in labels)], values
    if task is TaskType.MULTILABEL:
        probabilities = torch.sigmoid(scores)
        labels = class_labels(class_names, probabilities.shape[1])
        separator = label_separator(labels)
        values = [
            [label_set([p > threshold for p in probs], labels, separator)]
            + [f"{p:.6g}" for p in probs]
            for probs in probabilities.tolist()
        ]
        return ["prediction", *(f"prob_{label}" for label in labels)], values
    flat = scores.reshape(len(scores), -1)
    names = (
        ["prediction"] if flat.shape[1] == 1 else [f"prediction_{j}" for j in range(flat.shape[1])]
    )
    return names, value_texts(flat if flat.dtype == torch.float64 else flat.float())
