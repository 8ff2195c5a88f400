"""The W&B side of `WandbLogger`, run as its own process: `python wandb_child.py`.

It reads one JSON command per line from stdin, and on end of input finishes the run. It is
started by file path, so it imports neither traineval nor torch (start-up stays short),
and the training process never hosts W&B's client threads, which compete for the GIL
(measured: 5-10% slower steps with no logging at all, once `wandb.init` has run).

Commands: {"init": {...wandb.init kwargs...}} first, then {"config": {...}},
{"log": {...}, "step": N} and {"summary": {...}}. A failure is written to stderr and the
process exits with status 1; the parent reports it when it closes the logger.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def serve(lines: Any) -> None:
    run = None
    for line in lines:
        command = json.loads(line)
        if "init" in command:
            import wandb

            options = command["init"]
            try:
                settings = wandb.Settings(x_disable_stats=True, console="off")
            except Exception:
                settings = None
            run = wandb.init(settings=settings, **options)
        elif run is None:
            raise RuntimeError("the first command must be init")
        elif "config" in command:
            run.config.update(command["config"], allow_val_change=True)
        elif "log" in command:
            run.log(command["log"], step=command["step"])
        elif "summary" in command:
            for key, value in command["summary"].items():
                run.summary[key] = value
    if run is not None:
        run.finish()


if __name__ == "__main__":
    # Run by path, Python puts this folder first on sys.path, where traineval's own
    # wandb.py would shadow the wandb package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    # Logging is background work: where it competes with training for a core, training
    # wins (wandb-core, started from here, inherits the lower priority).
    if hasattr(os, "nice"):
        os.nice(10)
    try:
        serve(sys.stdin)
    except Exception as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
