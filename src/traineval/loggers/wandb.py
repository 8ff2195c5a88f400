"""Weights & Biases: config, metrics at the loop's steps, best-metric summary, one run per
run directory (its id is kept there, so a resumed run continues the same W&B run).

W&B runs in a child process (`wandb_child.py`) fed JSON lines through a pipe: the training
process does not import wandb or host its client threads, and does not wait for W&B to
start. `close` waits for the child to finish writing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..system.files import atomic_write_text
from .base import numbers

ID_FILE = "wandb_run_id.txt"
CHILD = Path(__file__).with_name("wandb_child.py")


class WandbLogger:
    """Log to W&B (`WANDB_MODE=offline` keeps everything on this machine)."""

    def __init__(
        self, run_dir: str | Path, project: str = "traineval", finish_timeout: float = 300.0
    ) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ImportError(
                "wandb_logging needs the wandb package: pip install 'traineval[wandb]'"
            )
        run_dir = Path(run_dir)
        id_file = run_dir / ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id)
        self.run_id = run_id
        self.finish_timeout = finish_timeout
        self._error_file = (run_dir / "wandb_process.log").open("w+", encoding="utf-8")
        self._child = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._error_file,
            text=True,
            # wandb-core is a Go program: one OS thread for its Go code is plenty here
            env={"GOMAXPROCS": "1", **os.environ},
        )
        self._send(
            {
                "init": {
                    "project": project,
                    "dir": str(run_dir),
                    "id": run_id,
                    "name": run_dir.name,
                    "resume": "allow",
                }
            }
        )

    def _send(self, command: dict[str, Any]) -> None:
        if self._child.poll() is not None:
            raise RuntimeError(f"the W&B process stopped: {self._errors()}")
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(json.dumps(command) + "\n")
            self._child.stdin.flush()
        except BrokenPipeError:
            self._child.wait(timeout=30)
            raise RuntimeError(f"the W&B process stopped: {self._errors()}") from None

    def _errors(self) -> str:
        self._error_file.seek(0)
        text = self._error_file.read().strip()
        return text.splitlines()[-1] if text else f"exit status {self._child.returncode}"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numbers(metrics)
        if "best_metric" in values:
            self._send({"summary": {"best_metric": values.pop("best_metric")}})
        if values:
            self._send({"log": values, "step": step})

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._send({"config": json.loads(json.dumps(dict(config), default=str))})

    def close(self) -> None:
        """Finish the W&B run; raises if the W&B process failed (LoggerHub reports it)."""
        try:
            if self._child.stdin is not None and not self._child.stdin.closed:
                self._child.stdin.close()  # end of input: the child finishes the run
            code = self._child.wait(timeout=self.finish_timeout)
            if code != 0:
                raise RuntimeError(f"the W&B process failed: {self._errors()}")
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self._child.kill()
            raise RuntimeError(f"the W&B process did not finish: {self._errors()}") from None
        finally:
            self._error_file.close()
            errors = Path(self._error_file.name)
            if errors.exists() and errors.stat().st_size == 0:
                errors.unlink()
