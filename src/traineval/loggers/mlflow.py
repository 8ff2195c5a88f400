"""MLflow: params, metrics at the loop's steps, and the run directory's files as artifacts.

The tracking store defaults to a SQLite database beside the run directories
(`<output_dir>/../mlflow.db`, artifacts in `../mlartifacts/`); the MLflow run id is kept in
the run directory, so a resumed run continues the same MLflow run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..system.files import atomic_write_text
from .background import BackgroundLogger
from .base import numbers

logger = logging.getLogger(__name__)

ID_FILE = "mlflow_run_id.txt"
# MLflow's HTTP client retries a failing request 7 times with back-off (minutes against an
# unreachable server); traineval bounds it unless you set these yourself.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
SKIPPED = ("checkpoints", "wandb", "tensorboard")  # large or logged elsewhere


def mlflow_logger(
    run_dir: str | Path, tracking_uri: str | None = None, kept: Sequence[Mapping[str, Any]] = ()
) -> BackgroundLogger:
    """An `MLflowLogger` on a thread of its own (see `BackgroundLogger`), with bounded HTTP
    time-outs and retries; `ImportError` at once when MLflow is not installed. `kept`: the
    records a resumed run keeps (metrics.jsonl's), sent first where the MLflow run is new (a
    run killed in its first seconds had created none: its points had not left its thread)."""
    if importlib.util.find_spec("mlflow") is None:
        raise ImportError("mlflow_logging needs MLflow: pip install 'traineval[mlflow]'")
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)

    def start() -> MLflowLogger:
        started = MLflowLogger(run_dir, tracking_uri)
        if started.created and kept:
            try:
                started.catch_up(kept)
            except Exception as error:  # the points to come still go: logging goes on
                logger.warning("MLflow: the points before the resume were not sent (%s)", error)
        return started

    return BackgroundLogger(start, "MLflow")


class MLflowLogger:
    """Log to an MLflow tracking store (a local SQLite database unless `tracking_uri`)."""

    def __init__(
        self, run_dir: str | Path, tracking_uri: str | None = None, experiment: str = "traineval"
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError(
                "mlflow_logging needs MLflow: pip install 'traineval[mlflow]'"
            ) from None
        self.run_dir = Path(run_dir).resolve()
        parent = self.run_dir.parent
        uri = tracking_uri or f"sqlite:///{parent / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(
                experiment, artifact_location=(parent / "mlartifacts").as_uri()
            )
        )
        id_file = self.run_dir / ID_FILE
        self.created = not id_file.exists()  # this run's MLflow run is new
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name)
            self.run_id = run.info.run_id
            atomic_write_text(id_file, self.run_id)
        self.tracking_uri = uri

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in numbers(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def catch_up(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Send the points of `records` (metrics.jsonl's, with their steps) to this run."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [
            Metric(name, value, now, int(record["step"]))
            for record in records
            if isinstance(record.get("step"), int)
            for name, value in numbers(record).items()
        ]
        for start in range(0, len(points), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=points[start : start + 1000])

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:6000]) for k, v in config.items() if str(k) not in existing]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def close(self) -> None:
        for path in sorted(self.run_dir.iterdir()):
            if path.name in SKIPPED or path.name == ID_FILE or path.name.startswith("."):
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)
