"""The learning-rate range test over a manager's training (`TrainingManager.find_learning_rate`).

The search trains what `train` would (the same mode, optimizer, precision, accumulation and
clipping) at the rates `RangeTest` sets, for at most `num_steps` updates with every loss
read; nothing is written or kept: the model's weights (every parameter and buffer, and its
modules' extra state) and the random streams are put back.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from ..config.training_config import TrainingConfig
from ..modes.contract import closing_step
from ..system import cpu_threads
from ..system.distributed import Distributed
from ..system.seeding import capture_rng, data_generators, deterministic_algorithms, restore_rng
from ..training.loop import Loop, Monitor, Observers, RunLength
from ..training.lr_finder import LearningRateSearch, RangeTest, SearchProgress
from ..training.steplog import NonFiniteError
from . import build


class Assembler(Protocol):
    """What the search needs of the manager: its config, job and device, and its first
    phases (`TrainingManager.plan`, `TrainingManager.optimization`)."""

    config: TrainingConfig
    distributed: Distributed
    device: torch.device

    def plan(self, request: build.Request) -> build.Assembly: ...

    def optimization(self, run: build.Assembly, *, schedule: bool = True) -> build.Optimization: ...


def search_learning_rate(
    manager: Assembler, request: build.Request, search: RangeTest
) -> LearningRateSearch:
    """Run the range test `search` on `request`'s model and data; see the module docstring."""
    model, config = request.model, manager.config
    kept = _ModelState(model)
    generators = data_generators(request.train_loader)
    streams = capture_rng(generators)
    try:
        loop = _search_loop(manager, request, search)
        with (
            closing_step(loop.step_fn),
            deterministic_algorithms(config.deterministic),
            cpu_threads.applied(config.cpu_threads, manager.device, model),
        ):
            loop.run()
    except NonFiniteError:
        search.stop_reason = "non-finite loss"
    finally:
        kept.restore()
        restore_rng(streams, generators)
    return search.result()


class _ModelState:
    """A copy of everything of a model's that training changes, put back by name (a module
    may have rebound a buffer meanwhile): its state dict (parameters, persistent buffers,
    each module's extra state) and its non-persistent buffers, which a state dict leaves
    out."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.transient = {
            name: buffer.detach().clone()
            for name, buffer in model.named_buffers()
            if name not in self.state
        }

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        for name, saved in self.transient.items():
            owner, _, leaf = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[leaf] = saved


def _search_loop(manager: Assembler, request: build.Request, search: RangeTest) -> Loop:
    """The manager's training for the range test, at the rates the search sets (no
    schedule, no moving average, no skipped steps)."""
    c, job, model = manager.config, manager.distributed, request.model
    run = manager.plan(request)  # nothing resumed: no payload
    plan, data = run.plan, run.data
    parts = manager.optimization(run, schedule=False)
    update = build.update_rule(c, plan, parts, model)
    update.weight_average, update.skip_non_finite = None, 0
    steps = search.num_steps
    return Loop(
        model=model,
        train_loader=data.batches,
        update=update,
        length=RunLength(steps, data.updates_per_epoch, max_steps=steps, log_every_n_steps=1),
        placement=build.placement(manager.device, parts, plan, job),
        monitor=Monitor("train_loss", minimize=True),
        observers=Observers(
            callbacks=[search, SearchProgress(steps, c.progress_bar if job.is_main else False)]
        ),
        data_generators=data_generators(data.batches),
    )
