"""Weights & Biases: config, metrics at the loop's steps, best-metric summary, one run per
run directory (its id is kept there, so a resumed run continues the same W&B run)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import numbers

ID_FILE = "wandb_run_id.txt"


class WandbLogger:
    """Log to W&B (`WANDB_MODE=offline` keeps everything on this machine)."""

    def __init__(self, run_dir: str | Path, project: str = "traineval") -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "wandb_logging needs the wandb package: pip install 'traineval[wandb]'"
            ) from None
        run_dir = Path(run_dir)
        id_file = run_dir / ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        # traineval monitors the process itself and prints its own progress: no W&B system
        # sampler, no console capture (which would intercept every progress-bar redraw)
        try:
            settings = wandb.Settings(x_disable_stats=True, console="off")
        except Exception:
            settings = None
        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            id=run_id,
            name=run_dir.name,
            resume="allow",
            settings=settings,
        )
        self.run_id = run_id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numbers(metrics)
        if "best/metric" in values:
            self.run.summary["best/metric"] = values.pop("best/metric")
        if values:
            self.run.log(values, step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()
