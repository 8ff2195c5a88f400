"""`metrics.jsonl`: one JSON record per logged event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..system.files import atomic_write_lines, json_records


class JsonlLogger:
    """Append `{"step": ..., **metrics}` records to a JSON-lines file.

    Non-finite floats are written as strings ("nan", "inf"), so every line is valid JSON.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"event": metrics.get("event", "log"), "step": step, **metrics}
        self._file.write(json.dumps(plain(record)) + "\n")
        self._file.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The config goes to config.yaml; nothing to add here."""

    def close(self) -> None:
        self._file.close()


def log_evaluation(path: str | Path, record: Mapping[str, Any], step: int, *, alone: bool) -> None:
    """Log an evaluation's `record` (an `eval` record of one split, naming the `checkpoint`
    it scored) at `step`. `alone` (no run is writing the file): in place of an earlier
    record of the same checkpoint and split at that step, atomically, so evaluating a
    checkpoint again, or resuming a finished run, logs its test once; the training loop's own
    records (they name no checkpoint) are never replaced. While a run appends to the file
    (not `alone`), the record is appended: a rewrite would leave the run writing to the file
    it replaced."""
    line = json.dumps(plain({"event": record.get("event", "log"), "step": step, **record}))
    if not alone or not Path(path).exists():
        with Path(path).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return
    keys = ("event", "split", "step", "checkpoint")
    same = (record.get("event"), record.get("split"), step, record.get("checkpoint"))
    kept = [raw for raw, earlier in json_records(path) if tuple(map(earlier.get, keys)) != same]
    atomic_write_lines(path, [*kept, line.encode() + b"\n"])


def plain(value: Any) -> Any:
    """`value` with non-finite floats as strings, so it dumps to valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a metrics.jsonl file: a line cut short by a crash, or one that is
    not a JSON object (a damaged or hostile file: bad bytes, nesting too deep) is skipped,
    as a resume passes over it (`json_records`)."""
    return [record for _, record in json_records(path)]
