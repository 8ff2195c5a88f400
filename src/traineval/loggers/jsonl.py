"""`metrics.jsonl`: one JSON record per logged event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..system.files import atomic_write_text


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


def log_replacing(path: str | Path, metrics: Mapping[str, Any], step: int) -> None:
    """Log `metrics` (an `eval` record of one split) at `step` in place of an earlier record
    of that split at that step (atomically): evaluating a run's checkpoint again, or a
    resume of a finished run, logs its test once, not beside the earlier one."""
    path = Path(path)
    record = {"event": metrics.get("event", "log"), "step": step, **metrics}
    same = (record["event"], record.get("split"), step)
    kept = []
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    earlier = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if not isinstance(earlier, dict):
                    continue
                if (earlier.get("event"), earlier.get("split"), earlier.get("step")) != same:
                    kept.append(line if line.endswith("\n") else line + "\n")
    kept.append(json.dumps(plain(record)) + "\n")
    atomic_write_text(path, "".join(kept))


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
    not a JSON object (a damaged or hostile file), is skipped."""
    records = []
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                if isinstance(record, dict):
                    records.append(record)
    return records
