"""How many CPU threads torch's operators use while traineval trains and evaluates.

torch starts one intra-op thread per core. On a small model each operator is too short to
share: the threads mostly wait for each other, and on a machine that other processes also
use they wait for cores too (OpenMP threads spin at each barrier), so a run can take several
times longer with more threads than with one (docs/benchmarks.md, "CPU threads").
`TrainingConfig.cpu_threads` sets the count for the run and puts torch's own back after it:
a number, "auto" (see `auto_threads`), or None (leave torch's setting as it is).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["applied", "auto_threads", "resolve"]

SMALL_MODEL_PARAMETERS = 500_000  # below this, one thread (benchmarks/bench_threads.py)


def auto_threads(model: nn.Module | None) -> int | None:
    """ "auto": one thread for a model under `SMALL_MODEL_PARAMETERS` parameters, torch's
    default (None) for larger ones, and None whenever the user chose a count for the
    process already (`OMP_NUM_THREADS`, or `torch.set_num_threads` before the run)."""
    if os.environ.get("OMP_NUM_THREADS") or model is None:
        return None
    parameters = sum(p.numel() for p in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else None


def resolve(setting: int | str | None, device: torch.device, model: nn.Module | None) -> int | None:
    """The thread count to set for a run on `device` (None: leave torch's)."""
    if device.type != "cpu" or setting is None:
        return None
    if setting == "auto":
        return auto_threads(model)
    return int(setting)


@contextlib.contextmanager
def applied(
    setting: int | str | None, device: torch.device, model: nn.Module | None = None
) -> Iterator[int]:
    """Run the body with the resolved thread count; torch's count is put back afterwards.
    Yields the count in force."""
    count = resolve(setting, device, model)
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield previous
        return
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
