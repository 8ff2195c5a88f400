"""A training run's checkpoints: what one holds, writing it from the loop, putting it back.

A checkpoint is a dict of tensors and plain values (it loads with weights_only): model and
optimizer state (full, also when FSDP shards the model), scheduler, GradScaler, every
rank's RNG, the loop's counters and data position, monitor, tracker and callback state, the
config, and each rank's state of a step that keeps one (`state_dict()`: PPO's rollout and
environments). With a moving average of the weights (`ema_decay`) the model's weights are
the average, the weights to use, and `training_weights` the optimizer's, to resume from.
Under torchrun every rank calls `save_from_loop` (gathering full states and RNGs
are collectives); rank 0 writes, the others wait.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..callbacks.base import saved_states, state_keys
from ..config.training_config import TrainingConfig, current_metric_name
from ..runs import checkpoint_process
from ..runs.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint_file,
    save_checkpoint_file,
    save_safetensors,
    unexportable,
    untied,
)
from ..runs.checkpoint_writer import CheckpointWriter, StagedWrites, Write, snapshot
from ..runs.shard_folders import (
    AT_RESUME_POINT,
    MARK,
    SHARDS,
    folder_name,
    remove,
    remove_older,
    shard_folder,
)
from ..system.devices import inexact
from ..system.distributed import (
    Distributed,
    empty_places,
    is_sharded,
    load_local_model_state,
    load_model_state,
    load_optimizer_state,
    local_part,
    model_state,
    optimizer_state,
)
from ..system.seeding import capture_rng
from ..system.version import __version__
from .steplog import NonFiniteError

if TYPE_CHECKING:
    from .loop import Loop

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Contents:
    """What every checkpoint holds: the counters, and full state dicts of the model and the
    optimizer (`distributed.model_state`, `distributed.optimizer_state`)."""

    epoch: int
    global_step: int
    weights: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    shards: str | None = None  # the shard folder holding the model and optimizer instead


def checkpoint_payload(
    name: str, config: TrainingConfig, contents: Contents, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict named `name`: `contents`, the config, and `extra` records."""
    c = contents
    tensors = {"model": c.weights, "optimizer": c.optimizer} if c.shards is None else {}
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "name": name,
        "epoch": c.epoch,
        "global_step": c.global_step,
        **tensors,
        SHARDS: c.shards,
        "scheduler": c.scheduler.state_dict() if c.scheduler is not None else None,
        "scaler": c.scaler.state_dict() if c.scaler is not None else None,
        "best_metric": c.best_metric,
        "best_epoch": c.best_epoch,
        "config": config.to_dict(),
        **(extra or {}),
    }


def save_from_loop(
    name: str,
    loop: Loop,
    config: TrainingConfig,
    folder: Path,
    mode: dict[str, Any] | None = None,
    writer: CheckpointWriter | None = None,
) -> Path:
    """Write `folder/{name}.pt` (and `best.safetensors` for "best") from the loop's state;
    with a `writer`, in the background (see `traineval.runs.checkpoint_writer`). With
    sharded checkpoints (`writes_shards`) every rank writes its part of the model and the
    optimizer beside it first (`_save_sharded`)."""
    job = loop.job
    path = folder / f"{name}.pt"
    # each rank's RNG and running sums (the loop's state is rank 0's)
    mine = job.gather((capture_rng(loop.data_generators), loop.state.rank_sums()))
    step_state = getattr(loop.step_fn, "state_dict", None)  # a step with state of its own
    loop.step_watch.check()  # (one without it whose attributes changed: said once)
    steps = job.gather(step_state()) if callable(step_state) else None  # each rank's
    ranks = {"rng": [rng for rng, _ in mine], "sums": [sums for _, sums in mine], "steps": steps}
    if writes_shards(config, loop):
        extra = _records(loop, config, mode, ranks) if job.is_main else None
        if name == "best" and loop.closing_after_resume_point and job.is_main:
            keep_best_at_resume_point(path, writer, shards=True)
        _save_sharded(name, loop, config, path, extra, writer)
        job.barrier()
        return path
    # full states: under FSDP gathering them is a collective, rank 0 receives them
    weights = model_state(loop.model)
    contents = _full_contents(loop, weights, _kept_weights(loop, weights), path)
    averaging: dict[str, Any] = {}
    if loop.weight_average is not None:  # the model's weights are the average
        averaging = {"training_weights": weights}
    if job.is_main:
        assert contents is not None
        extra = {**_records(loop, config, mode, ranks), **averaging}
        payload = checkpoint_payload(name, config, contents, extra)
        if name == "best" and loop.closing_after_resume_point:
            keep_best_at_resume_point(path, writer)
        if writer is not None:
            _save_in_background(writer, name, loop, contents.weights, payload, path)
        else:
            if name == "best" and exports_weights(loop):
                _export_best(loop, contents, path)
            save_checkpoint_file(payload, path)
            remove_older(folder, name, keep=None)  # a sharded mode's, before a resume
    job.barrier()  # the others go on once the file is there (or, async, its snapshot taken)
    return path


def keep_best_at_resume_point(
    path: Path, writer: CheckpointWriter | None, *, shards: bool = False
) -> None:
    """The closing evaluation of a max_steps stop (after the resume point, `last.pt`, was
    written) is about to replace `best.pt`: keep the best up to the resume point beside it,
    as hard links (no copy), once, for a resume to put back (`put_back_best`); a resumed
    run is the uninterrupted one, which never made that evaluation. A sharded checkpoint's
    folder is kept first, as `best.at-resume-point.shards-<id>` (its files linked)."""
    for waiting in (writer, getattr(writer, "target", None)):
        if waiting is not None:
            waiting.wait()  # the best before it is on disk
    kept = path.with_name(f"{path.stem}{AT_RESUME_POINT}.pt")
    if kept.exists() or not path.exists():
        return
    kept.with_suffix(".safetensors").unlink(missing_ok=True)  # (a kill's lone link)
    if shards:
        payload = load_checkpoint_file(path, read_shards=False)
        _keep_shards(path, shard_folder(path, payload))
    for suffix in (".safetensors", ".pt"):  # the .pt last: it says the rest is there
        if path.with_suffix(suffix).exists():
            os.link(path.with_suffix(suffix), kept.with_suffix(suffix))


def _keep_shards(path: Path, shards: Path) -> None:
    """A copy of `shards` by hard links, named for `path`'s kept best, made under a hidden
    name and then renamed: a kill leaves no part under the kept name."""
    token = shards.name.rpartition(MARK)[2]
    copy = shards.with_name(folder_name(f"{path.stem}{AT_RESUME_POINT}", token))
    partial = copy.with_name(f".{copy.name}.partial")
    remove(partial)
    shutil.copytree(shards, partial, copy_function=os.link)
    remove(copy)  # (one a kill left before the .pt was linked)
    os.rename(partial, copy)


def put_back_best(folder: Path) -> None:
    """A resume: the best of the run up to its resume point replaces the one its closing
    evaluation wrote (`keep_best_at_resume_point`); a kept shard folder takes back the
    name the kept file gives it, and the closing evaluation's folder goes."""
    kept_file = folder / f"best{AT_RESUME_POINT}.pt"
    named = None
    for kept_shards in folder.glob(f"*best{AT_RESUME_POINT}{MARK}*"):
        if not kept_file.exists() or kept_shards.name.startswith("."):  # a kill cut it short
            remove(kept_shards)
            continue
        named = folder / folder_name("best", kept_shards.name.rpartition(MARK)[2])
        remove(named)  # (a put-back a kill cut short renamed it already)
        os.rename(kept_shards, named)
    for suffix in (".safetensors", ".pt"):  # the .pt last, as it was kept
        kept = folder / f"best{AT_RESUME_POINT}{suffix}"
        if kept_file.exists() and kept.exists():
            os.replace(kept, folder / f"best{suffix}")
        elif kept.exists():  # a kill before the .pt was linked: not a kept best
            kept.unlink()
    if named is not None:
        remove_older(folder, "best", keep=named.name)


def writes_shards(config: TrainingConfig, loop: Loop) -> bool:
    """Whether the loop's checkpoints are written in shards (`shards_for`)."""
    return shards_for(config, loop.job, loop.model)


def shards_for(config: TrainingConfig, job: Distributed, model: nn.Module) -> bool:
    """Whether checkpoints are written in shards (`checkpoint_sharding`): "auto" where FSDP
    shards the model over ranks, "sharded" always, "full" never."""
    if config.checkpoint_sharding == "auto":
        return job.enabled and is_sharded(model)
    return config.checkpoint_sharding == "sharded"


def sharded() -> Any:
    """`traineval.runs.sharded`, imported when a checkpoint is sharded (it imports
    torch.distributed.checkpoint, a second's work)."""
    from ..runs import sharded as module

    return module


def _contents(loop: Loop, weights: Any, optimizer: Any, shards: str | None = None) -> Contents:
    state = loop.state
    return Contents(
        state.epoch,
        state.global_step,
        weights=weights,
        optimizer=optimizer,
        scheduler=loop.scheduler,
        scaler=loop.precision.scaler,
        best_metric=state.best_metric,
        best_epoch=state.best_epoch,
        shards=shards,
    )


def _kept_weights(loop: Loop, weights: dict[str, Any]) -> dict[str, Any]:
    """The full weights to keep (`Loop.weights_to_keep`) beside the trained `weights`: their
    moving average, with one; under FSDP gathered from its shards (a collective)."""
    if loop.weight_average is not None and is_sharded(loop.model):
        with loop.weights_to_keep():
            return model_state(loop.model)
    return loop.state_to_keep(weights)


def _full_contents(
    loop: Loop, weights: dict[str, Any], kept: dict[str, Any], path: Path
) -> Contents | None:
    """The full model and optimizer states (rank 0's; None on the others): `kept`, the
    weights to keep (`_kept_weights`), refused when the trained `weights` are not finite."""
    optimizer = optimizer_state(loop.model, loop.optimizer)
    if not loop.job.is_main:
        return None
    refuse_non_finite(weights, path)
    return _contents(loop, kept, optimizer)


def _save_sharded(
    name: str,
    loop: Loop,
    config: TrainingConfig,
    path: Path,
    extra: dict[str, Any] | None,
    writer: CheckpointWriter | None,
) -> None:
    """Every rank: check its part of the model is finite (every rank refuses, naming the
    first bad tensor), then write it with the optimizer's and the callbacks' (`BestWeights`)
    into a new shard folder; rank 0 (`extra`: its records) then writes `best.safetensors`
    from the folder (for "best") and `path`, naming the folder. With a `ShardWriter`, in
    the background once every rank has copied its part (`traineval.runs.shard_writer`)."""
    from ..runs.shard_export import tied_names
    from ..runs.shard_writer import ShardWriter, agreed, finish_save

    module = sharded()
    state = _shards_to_save(loop)
    _refuse_non_finite_shards(loop, state, path)
    shards = module.new_folder(path.parent, name, loop.job)
    payload = None
    if extra is not None:
        payload = checkpoint_payload(name, config, _contents(loop, None, None, shards.name), extra)
    exporting = name == "best" and exports_weights(loop)
    skip = tied_names(loop.model) if exporting else None  # None: no best.safetensors
    if isinstance(writer, StagedWrites) and not loop.job.enabled:  # put off: copied now
        copy = writer.snapshot("shards", state), snapshot(payload)
        writer.submit(
            [Write("call", path, partial(_write_later, shards, path, copy, skip))], str(path)
        )
        return
    if isinstance(writer, StagedWrites):  # under torchrun a save is never put off
        writer = writer.target
    if isinstance(writer, ShardWriter):
        _wait_for_the_previous_write(writer, path, said=False)
        writes = [Write("shards", shards, writer.stage(state))]
        if payload is not None:
            writes.append(Write("files", path, (shards, snapshot(payload), skip)))
        writer.submit(writes, str(path), loop.state.global_step)
        return
    module.write_shards(shards, state, loop.job)
    failed: BaseException | None = None
    if payload is not None:
        try:
            finish_save(shards, path, payload, skip)
        except Exception as error:  # said on every rank, not only rank 0
            failed = error
    failed = agreed(failed, loop.job)
    if failed is not None:
        raise failed


def _write_later(shards: Path, path: Path, copy: tuple[Any, Any], skip: set[str] | None) -> None:
    """A one-process sharded save the write budget put off: its folder, then (with a
    checkpoint's dict) its files, from the copy made when it was asked for."""
    from ..runs.shard_writer import finish_save

    state, payload = copy
    sharded().write_shards(shards, state, Distributed())
    if payload is not None:
        finish_save(shards, path, payload, skip)


def _shards_to_save(loop: Loop) -> dict[str, Any]:
    """This rank's part of what a sharded checkpoint's folder holds: the model and the
    optimizer; with a moving average, the average as the model and the trained weights as
    `training_weights`; the callbacks' parts (`_callback_shards`)."""
    state = sharded().sharded_state(loop.model, loop.optimizer)
    if loop.weight_average is not None:
        state["training_weights"] = state["model"]
        state["model"] = loop.weight_average.averaged_state(state["model"])
    parts = _callback_shards(loop)
    if parts:
        state["callbacks"] = parts
    return state


def _refuse_non_finite_shards(loop: Loop, state: dict[str, Any], path: Path) -> None:
    """Every rank refuses to save when any rank's part of the model holds NaN or inf,
    naming the first bad tensor."""
    from ..runs.shard_writer import agreed

    trained = state.get("training_weights", state["model"])
    local = {k: local_part(v) if torch.is_tensor(v) else v for k, v in trained.items()}
    problem: NonFiniteError | None = None
    try:
        refuse_non_finite(local, path)
    except NonFiniteError as error:
        problem = error
    failed = agreed(problem, loop.job, said_as=NonFiniteError)
    if failed is not None:
        raise failed


def _callback_shards(loop: Loop) -> dict[str, Any]:
    """Each callback's part of a sharded model's tensors (`shard_state`: `BestWeights`'s
    best shards), by its checkpoint key: each rank writes its own into the folder."""
    parts = {}
    for key, callback in zip(state_keys(loop.callbacks), loop.callbacks, strict=True):
        shard_state = getattr(callback, "shard_state", None)
        part = shard_state(loop.model) if callable(shard_state) else None
        if part is not None:
            parts[key] = part
    return parts


def _restore_callback_shards(loop: Loop, shards: Path) -> None:
    """Give each callback with a part in a sharded checkpoint's folder (`_callback_shards`)
    its part back, each rank reading the pieces of its shards."""
    module = sharded()
    reader = module.SafeReader(shards)
    saved = reader.checked.state_dict_metadata
    state: dict[str, Any] = {}
    takers: dict[str, Any] = {}
    for key, callback in zip(state_keys(loop.callbacks), loop.callbacks, strict=True):
        template = getattr(callback, "shard_template", None)
        if callable(template) and any(k.startswith(f"callbacks.{key}.") for k in saved):
            state[key], takers[key] = template(loop.model), callback
    if state:
        module.read_into(reader, {"callbacks": state}, module.reads_alone(loop.model))
        for key, callback in takers.items():
            callback.load_shard_state(state[key])


def _records(
    loop: Loop, config: TrainingConfig, mode: dict[str, Any] | None, ranks: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint holds beside the model and optimizer: the loop's counters and
    history, random streams (`ranks["rng"]`, each rank's), monitor, tracker, callbacks,
    the mode, each rank's step state (`ranks["steps"]`), and where it was written."""
    state, job = loop.state, loop.job
    return {
        "loop": loop.history_json["loop"](state.state_dict()),
        "rng": ranks["rng"][0],
        "rng_per_rank": ranks["rng"],
        "sums_per_rank": ranks["sums"],
        "monitor": {"name": loop.monitor.name, **loop.monitor.state_dict()},
        "tracker": loop.history_json["tracker"](loop.tracker.state_dict()),
        "callbacks": {
            key: storable(cb.state_dict(), f"callback {key!r}: state_dict()")
            for key, cb in zip(state_keys(loop.callbacks), loop.callbacks, strict=True)
        },
        "mode": mode,
        **({"ema": average.state_dict()} if (average := loop.weight_average) else {}),
        "step_per_rank": ranks["steps"],
        "log_records": loop.loggers.records,  # metrics.jsonl's records up to this point
        "world_size": job.world_size,
        "distributed_strategy": config.distributed_strategy if job.enabled else None,
        "traineval_version": __version__,
    }


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def storable(value: Any, where: str) -> Any:
    """`value` as a checkpoint loads it back (`weights_only`: tensors and plain Python
    values): numpy numbers become Python numbers and numpy arrays tensors; anything else
    is a ValueError naming `where` and the path to it, before the file is written (a
    callback's deque or object made every checkpoint of the run unreadable)."""
    if isinstance(value, _PLAIN) or torch.is_tensor(value):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return type(value)((k, storable(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple, set, torch.Size)):
        items = [storable(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return type(value)(items) if type(value) in (list, tuple, set, torch.Size) else items
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a "
        "checkpoint cannot load back safely (it holds tensors, numbers, strings, lists, "
        "tuples, sets and dicts of them): return it as one of those"
    )


def check_callback_states(loop: Loop) -> None:
    """Before training: each callback's state is one a checkpoint can hold (`storable`)."""
    for key, callback in zip(state_keys(loop.callbacks), loop.callbacks, strict=True):
        storable(callback.state_dict(), f"callback {key!r}: state_dict()")


def exports_weights(loop: Loop) -> bool:
    """Whether `best.safetensors` is written beside `best.pt`: unless the model holds a
    tensor safetensors cannot store (`unexportable`: a sparse buffer, complex128), which
    is said once a run; `best.pt` holds the weights then."""
    refused = unexportable(loop.model.state_dict())
    if refused is None:
        return True
    if loop.job.is_main and not loop.saves.export_refusal_said:
        loop.saves.export_refusal_said = True
        logger.warning(
            "best.safetensors is not written: %s; best.pt holds the best weights "
            "(traineval evaluate, load_checkpoint and load_model read it)",
            refused,
        )
    return False


def _export_best(loop: Loop, contents: Contents, path: Path) -> None:
    """`best.safetensors` beside `best.pt`: the weights to use (the average, with one). (A
    sharded checkpoint's are written from its folder: `_save_sharded`.)"""
    if is_sharded(loop.model):
        save_safetensors(contents.weights, path.with_suffix(".safetensors"))
    else:
        with loop.weights_to_keep():
            save_safetensors(loop.model, path.with_suffix(".safetensors"))


def refuse_non_finite(weights: dict[str, Any], path: Path) -> None:
    """Refuse to write `path` when a parameter or buffer in `weights` holds NaN or inf
    (`NonFiniteError` naming it): the previous file stays, and a resume never starts from
    a poisoned state. One check of every tensor, read back once."""
    names = [k for k, v in weights.items() if torch.is_tensor(v) and inexact(v)]
    if not names:
        return
    finite = torch.stack([torch.isfinite(_stored(weights[k])).all().cpu() for k in names])
    if bool(finite.all()):
        return
    bad = names[int((~finite).nonzero()[0])]
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    raise NonFiniteError(
        f"refusing to write {path.name}: the model's {bad!r} holds NaN or infinite values; {kept}"
    )


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores: a sparse one's (without its implicit zeros)."""
    if tensor.layout == torch.strided:
        return tensor
    return tensor._values() if tensor.layout == torch.sparse_coo else tensor.values()


def _save_in_background(
    writer: CheckpointWriter,
    name: str,
    loop: Loop,
    weights: dict[str, Any],
    payload: dict[str, Any],
    path: Path,
) -> None:
    """Snapshot what the save writes (the loop waits only for this), then hand the files
    to the writer thread: `best.safetensors` first for "best", then the checkpoint. Without
    a moving average, one snapshot of both: the weights they share are copied once. With
    one, the exported average is copied while the model holds it (the block puts the
    training weights back, and the checkpoint's `training_weights` are views of them)."""
    stopped = writer.supersede(str(path), loop.state.global_step)  # e.g. an epoch's end
    _wait_for_the_previous_write(writer, path, said=stopped)
    exported: dict[str, Any] = {}  # to copy with the checkpoint
    average: dict[str, Any] | None = None  # copied already
    exporting = name == "best" and exports_weights(loop)
    if exporting and is_sharded(loop.model):
        exported = untied(weights)
    elif exporting and loop.weight_average is not None:
        with loop.weights_to_keep():
            average = writer.snapshot("average", untied(loop.model.state_dict()))
    elif exporting:
        exported = untied(loop.model.state_dict())
    kind = "best" if name == "best" else "checkpoint"  # the buffers one shape of save lends
    copied = writer.snapshot(kind, {"checkpoint": payload, "weights": exported})
    writes: list[Write] = []
    if exporting:
        files = average if average is not None else copied["weights"]
        writes.append(Write("safetensors", path.with_suffix(".safetensors"), files))
    writes.append(Write("checkpoint", path, copied["checkpoint"]))
    writer.submit(writes, str(path), loop.state.global_step)


def shard_writer(config: TrainingConfig, job: Distributed) -> CheckpointWriter:
    """Every rank's writer of sharded checkpoints in the background (a collective: it
    makes the process group its writes use; `traineval.runs.shard_writer`)."""
    from ..runs.shard_writer import ShardWriter

    return ShardWriter(job, config.distributed_timeout_seconds)


def background_writer(choice: str, device: torch.device) -> CheckpointWriter:
    """The writer of `async_checkpointing` (`checkpoint_writer`): a process of its own where
    the platform allows it (for "auto": a CPU run's; it costs less than the thread with or
    without a free core, `benchmarks/results/checkpoint_cpu.md`); else a thread. A GPU
    run's "auto" is the thread, whose copies go through pinned memory, until the process
    is measured on a GPU (its arena's copies from the device are pageable)."""
    wanted = choice == "process" or (choice == "auto" and device.type == "cpu")
    if wanted and checkpoint_process.available():
        return checkpoint_process.ProcessWriter()
    return CheckpointWriter()


BACKGROUND_FROM = 48 * 2**20  # bytes of weights from which `async_checkpointing: null`
# writes in the background: from a 12.6M-parameter model (a 150 MB checkpoint with AdamW)
# the writer process costs no more than writing in place with training on every core and
# less with a core free (benchmarks/results/checkpoint_cpu.md); on small checkpoints its
# start and a round trip a save cost more than the saves


def writes_in_background(
    config: TrainingConfig, device: torch.device, model: nn.Module, sharded: bool = False
) -> bool:
    """Whether the run writes its checkpoints in the background: `async_checkpointing` as
    set, or for null (auto) where it was measured to win: a CPU run where the writer process
    runs (Linux), `checkpoint_writer` not "thread", whose model holds at least 48 MiB of
    weights and whose copy fits in a quarter of the free memory; not where checkpoints are
    `sharded` (their writer threads cost 102-110% of writing in place on a 2-core CPU,
    benchmarks/results/checkpoint_cpu.md)."""
    if config.async_checkpointing is not None:
        return bool(config.async_checkpointing)
    if device.type != "cpu" or config.checkpoint_writer == "thread" or sharded:
        return False
    tensors = itertools.chain(model.parameters(), model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    # the copy it holds (weights and, with AdamW, two moments) takes a quarter of the free
    # memory at most: a default does not double a large model's footprint unasked
    fits = 3 * weights <= available_memory() / 4
    return weights >= BACKGROUND_FROM and fits and checkpoint_process.available()


def available_memory() -> float:
    """Bytes of memory free for the run (Linux: available physical pages; else unbounded)."""
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return float("inf")


SLOW_WRITES = 0.05  # seconds a save may wait for the previous write before it is said


def _wait_for_the_previous_write(writer: CheckpointWriter, path: Path, said: bool) -> None:
    """At most one write in flight: a save waits for the previous one. When it has to wait
    (the writes take longer than the time between saves), say so once a run, with what to
    change: a silent slowdown would look like a slow model (`said`: not for a write this
    save stopped, whose wait is the record in hand)."""
    busy = writer.busy and not said
    started = time.perf_counter()
    writer.wait()
    waited = time.perf_counter() - started
    if busy and waited > SLOW_WRITES and not writer.slow_said:
        writer.slow_said = True
        logger.warning(
            "checkpoint writes cannot keep up: saving %s waited %.2fs for the previous write "
            "to finish; training waits for every such save (save less often: "
            "checkpoint_every_n_steps, checkpoint_save_frequency)",
            path.name,
            waited,
        )


def finished(payload: dict[str, Any], config: TrainingConfig) -> bool:
    """Whether a checkpointed run has nothing left to do under `config` (which may extend it:
    more epochs or steps, or a stop condition changed so that it no longer holds)."""
    state = payload["loop"]
    if state["stopped_early"] and _stop_holds(payload, config):
        return True
    if config.max_steps is not None and state["global_step"] >= config.max_steps:
        return True
    return state["batch_in_epoch"] == 0 and state["epoch"] >= config.num_epochs


def _stop_holds(payload: dict[str, Any], config: TrainingConfig) -> bool:
    """Whether the condition that stopped a run still stops it under `config`: early
    stopping whose patience its evaluations without improvement still reach, a `stop_when`
    condition its stopping value still meets. A stop asked by a callback of your own is
    for that callback to ask again: the resume continues."""
    from ..config.conditions import parse_condition

    state, reason = payload["loop"], payload["loop"].get("stop_reason") or ""
    if reason.startswith("early stopping"):
        patience = config.early_stopping_patience
        return bool(patience) and payload["monitor"]["num_bad"] >= patience
    if not reason.startswith("stop_when"):
        return False
    history = state["history"]
    history = json.loads(history) if isinstance(history, str) else history
    for text in config.stop_when:
        condition = parse_condition(text, "stop_when")
        name = condition.metric
        if name.startswith("val_"):
            value = (history["val_metrics"] or [{}])[-1].get(name[4:])
        else:
            value = (history.get(name) or [None])[-1]
        if value is not None and condition.met(float(value)):
            return True
    return False


def training_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """The weights to continue training from: with a moving average the checkpoint's
    model weights are the average, and the trained ones sit beside them."""
    return payload.get("training_weights", payload["model"])


def in_shards(payload: dict[str, Any]) -> bool:
    """Whether a resumed checkpoint keeps its model and optimizer in a shard folder
    (`find_checkpoint` names it by its path)."""
    return payload.get(SHARDS) is not None and "model" not in payload


def saved_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """The weights a resume continues from, to check a model against: a sharded
    checkpoint's as empty tensors of their shapes."""
    if in_shards(payload):
        from ..runs.shard_metadata import shapes

        return shapes(Path(payload[SHARDS]))
    return training_weights(payload)


def _trained_part(payload: dict[str, Any]) -> str:
    """Where a sharded checkpoint's folder holds the trained weights: beside the average
    (the folder's "model") in a run with a moving average."""
    return "training_weights" if "ema" in payload else "model"


def _saved_average(loop: Loop, payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's moving average of the weights (its "model"): a sharded checkpoint's
    read from its folder, each rank the pieces of its shards (a collective under FSDP)."""
    if not in_shards(payload):
        return payload["model"]
    module = sharded()
    places = {"model": empty_places(loop.model)}
    reader = module.SafeReader(Path(payload[SHARDS]))
    module.read_into(reader, places, module.reads_alone(loop.model))
    return places["model"]


def restore_weights(model: torch.nn.Module, payload: dict[str, Any], kept: bool = False) -> None:
    """Load the weights a resume continues from into `model`; `kept`: the weights to use
    instead (a finished run's: the average, with one, as the run ended with)."""
    if in_shards(payload):
        part = "model" if kept else _trained_part(payload)
        sharded().load_into(Path(payload[SHARDS]), model, part=part)
    else:
        model.load_state_dict(payload["model"] if kept else training_weights(payload))


def restore_best(model: torch.nn.Module, payload: dict[str, Any]) -> bool:
    """Load the weights `restore_best_weights` kept (`BestWeights`) into `model`, as a
    finished run ended with them; False where the checkpoint keeps none."""
    key = "BestWeights"
    if in_shards(payload):  # each rank's best shards sit in the folder
        module = sharded()
        reader = module.SafeReader(Path(payload[SHARDS]))
        if any(k.startswith(f"callbacks.{key}.") for k in reader.checked.state_dict_metadata):
            state = {"callbacks": {key: empty_places(model)}}
            module.read_into(reader, state, module.reads_alone(model))
            best = state["callbacks"][key]
            load_local_model_state(model, {k: local_part(v) for k, v in best.items()})
            return True
    kept = (saved_states(payload.get("callbacks", {})).get(key) or {}).get("best_state")
    if kept is None:
        return False
    load_model_state(model, kept)
    return True


def restore_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any]
) -> None:
    """Load a checkpoint's optimizer state into `optimizer`; a sharded checkpoint's model
    weights too, each rank reading the pieces of its shards."""
    if in_shards(payload):
        sharded().load_into(Path(payload[SHARDS]), model, optimizer, _trained_part(payload))
    else:
        load_optimizer_state(model, optimizer, payload["optimizer"])


def restore_loop(loop: Loop, payload: dict[str, Any]) -> None:
    """Put a checkpoint's loop counters, monitor, tracker, callbacks, moving average and RNG
    back (a checkpoint without an average starts one)."""
    state = loop.state
    state.load_state_dict(payload["loop"])
    # the resumed run goes on: how the checkpointed one stopped is not how this one ends
    state.stop_reason, state.stopped_early, state.finished, state.timed_out = (
        None,
        False,
        False,
        False,
    )
    if loop.weight_average is not None and "ema" in payload:
        loop.weight_average.load(payload["ema"], _saved_average(loop, payload))
    monitor_state = {**payload["monitor"], "name": current_metric_name(payload["monitor"]["name"])}
    if monitor_state["name"] != loop.monitor.name:
        raise ValueError(
            f"cannot resume: the checkpoint monitors {monitor_state['name']!r}, the config "
            f"{loop.monitor.name!r}"
        )
    loop.monitor.load_state_dict(monitor_state)
    loop.tracker.load_state_dict(payload["tracker"])
    saved = saved_states(payload.get("callbacks", {}))
    for key, callback in zip(state_keys(loop.callbacks), loop.callbacks, strict=True):
        if key in saved:
            callback.load_state_dict(saved[key])
    if in_shards(payload):
        _restore_callback_shards(loop, Path(payload[SHARDS]))
    steps, load_step = payload.get("step_per_rank"), getattr(loop.step_fn, "load_state_dict", None)
    if steps is not None and callable(load_step):
        if len(steps) != loop.job.world_size:
            raise ValueError(
                f"cannot resume: the checkpoint's step state is of {len(steps)} ranks (its "
                f"environments, rollouts), this run has {loop.job.world_size}"
            )
        load_step(steps[loop.job.rank])
    per_rank = payload.get("rng_per_rank")
    loop.resume_rng = per_rank[loop.job.rank] if per_rank else payload["rng"]
    sums = payload.get("sums_per_rank")  # (older checkpoints: rank 0's, in "loop")
    if sums is not None and len(sums) == loop.job.world_size:
        state.load_rank_sums(sums[loop.job.rank])
