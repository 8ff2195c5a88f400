"""Checkpoint files: atomic writes, and loads that never unpickle arbitrary objects."""

from __future__ import annotations

import pickle
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import torch

from ..system.devices import move_to_device
from ..system.files import atomic_file
from .errors import CheckpointError
from .shard_folders import AT_RESUME_POINT, SHARDS, keeps_shards_in, owner, remove, shard_folder
from .shard_folders import MARK as SHARD_MARK

CHECKPOINT_FORMAT = "traineval-checkpoint"  # a training checkpoint's "format" entry
CHECKPOINT_VERSION = 1


def save_checkpoint_file(
    payload: dict[str, Any], path: str | Path, *, stop: Callable[[int], bool] | None = None
) -> Path:
    """Write `payload` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash during the write leaves any previous file at `path` untouched; a failed write
    (a full disk, no permission) is a `WriteError` naming `path`. With `stop`, asked before
    each record (with its size in bytes) and before the fsync, the write ends where it is
    first true, the previous file untouched (the caller tells that end from a failure).
    """
    with atomic_file(path, (RuntimeError,)) as temporary, temporary.open("wb") as handle:
        # torch's zip writer says a full disk (and a stop) as a RuntimeError
        torch.save(payload, handle if stop is None else cast(IO[bytes], _Stoppable(handle, stop)))
        if stop is not None and stop(0):  # before the fsync, most of a write's time
            raise RuntimeError("the write was stopped")
    return Path(path)


class _Stoppable:
    """A file whose writes fail once `stop(size)` is true (see `save_checkpoint_file`)."""

    def __init__(self, handle: Any, stop: Callable[[int], bool]) -> None:
        self.handle, self.stop = handle, stop

    def write(self, data: Any) -> int:
        if self.stop(memoryview(data).nbytes):
            raise RuntimeError("the write was stopped")
        return int(self.handle.write(data))

    def flush(self) -> None:
        self.handle.flush()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temp files left by a save that was killed mid-write (they are never loaded),
    and shard folders no checkpoint file names (`traineval.runs.sharded`)."""
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    for shards in _unnamed_shard_folders(folder):
        remove(shards)
        stale.append(shards)
    return stale


UNREADABLE = object()


def _unnamed_shard_folders(folder: Path) -> list[Path]:
    """Shard folders of a checkpoint whose file names another folder, or that has no file:
    what a save killed before it replaced the file left. Kept when the file is unreadable."""
    found = sorted(folder.glob(f"*{SHARD_MARK}*")) if folder.is_dir() else []
    named: dict[Path, Any] = {}
    unnamed = []
    for shards in found:
        name = owner(shards.name)
        if name is None or not (shards.is_dir() or shards.is_symlink()):
            continue
        # its file; for a best, also the best kept at a resume point (a put-back that a kill
        # cut short has renamed the kept folder back before it replaced best.pt)
        files = [folder / f"{name}.pt", folder / f"{name}{AT_RESUME_POINT}.pt"]
        says = [_named_by(file, named) for file in files]
        if UNREADABLE not in says and not any(keeps_shards_in(n, shards.name) for n in says):
            unnamed.append(shards)
    return unnamed


def _named_by(file: Path, named: dict[Path, Any]) -> Any:
    """The shard folder `file` names (None: no file; `UNREADABLE`), read once."""
    if file not in named:
        try:
            named[file] = _load_file(file, "cpu", mmap=True).get(SHARDS) if file.exists() else None
        except CheckpointError:
            named[file] = UNREADABLE  # keep what may be its shards
    return named[file]


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", *, mmap: bool = False, read_shards: bool = True
) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; never falls back to full unpickling.

    `mmap=True` maps the tensors instead of reading them (cheap: to read a checkpoint's
    counters; a tensor's bytes are only checked when it is used). A sharded checkpoint
    (`traineval.runs.sharded`) gets its `model` and `optimizer` read whole from its shard
    folder (onto the CPU, then to `map_location` where that names a device), unless `mmap`
    or not `read_shards` (then `shards` names the folder). A file that a run still training
    replaces while it is read is read again.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds objects other
            than tensors and plain Python values (nothing in it is executed).
    """
    path = Path(path)
    for _ in range(3):
        payload = _load_file(path, map_location, mmap)
        if payload.get(SHARDS) is None or not read_shards or mmap:
            return payload
        from . import sharded

        try:
            whole = sharded.read_whole(shard_folder(path, payload))
        except CheckpointError:
            if _shards_named(path) == payload[SHARDS]:
                raise
            continue  # a save replaced the file and removed the folder it named
        payload.update(_placed(whole, map_location))
        return payload
    raise CheckpointError(f"checkpoint {str(path)!r} was replaced each time it was read")


def _shards_named(path: Path) -> Any:
    """The shard folder the file at `path` names now (None if it cannot be read)."""
    try:
        return _load_file(path, "cpu", mmap=True).get(SHARDS)
    except CheckpointError:
        return None


def _load_file(path: Path, map_location: Any, mmap: bool) -> dict[str, Any]:
    """The dict in the checkpoint file at `path` (see `load_checkpoint_file`)."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt (not a torch.save zip archive)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain values; "
            f"refusing to unpickle it{_what_it_holds(error)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({error})"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a dict")
    return payload


def _what_it_holds(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file would have loaded (`Trying to
    load unsupported GLOBAL posix.system ...`); not its advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line]
    return f" ({said[0]})" if said else ""


def _placed(tree: Any, map_location: Any) -> Any:
    """`tree`'s tensors moved to `map_location` where it names a device (a mapping or a
    function maps saved devices, and shards are read onto the CPU)."""
    if map_location in (None, "cpu") or not isinstance(map_location, str | torch.device):
        return tree
    return move_to_device(tree, torch.device(map_location))


def save_safetensors(model: torch.nn.Module | dict[str, Any], path: str | Path) -> Path:
    """Export `model`'s weights (or a state dict's tensors) as safetensors, atomically:
    each tensor once under its first name (tied weights: `load_safetensors` re-ties them),
    with `format: pt` metadata. A module's extra state is not a tensor and is left out. A
    tensor safetensors cannot store (sparse, complex128, ...) is a `ValueError` naming it,
    before anything is written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    refused = unexportable(state)
    if refused is not None:
        raise ValueError(f"cannot write {Path(path).name}: {refused}")
    tensors = untied(state)
    storages = Counter(_storage(t) for t in tensors.values())
    with atomic_file(path, (SafetensorError, RuntimeError)) as temporary:
        # views of one tensor that are not the same view (parameters cut from one block)
        # are each stored as their own copy: the file holds no shared memory
        stored = {
            name: t.detach().clone() if storages[_storage(t)] > 1 else t.detach().contiguous()
            for name, t in tensors.items()
        }
        save_file(stored, temporary, metadata={"format": "pt"})
    return Path(path)


def unexportable(state: dict[str, Any]) -> str | None:
    """Why safetensors cannot store a state dict's tensors (the first that it cannot: a
    sparse tensor, a dtype it lacks), or None."""
    from .file_plans import stored_dtypes

    for name, tensor in tensor_entries(state).items():
        if tensor.layout != torch.strided:
            return f"{name!r} is a sparse tensor, which safetensors cannot store"
        if tensor.dtype not in stored_dtypes():
            return f"{name!r} is of dtype {tensor.dtype}, which safetensors cannot store"
    return None


def tensor_entries(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict's tensors: not a module's extra state (`get_extra_state`, any value),
    which checkpoints keep and a weights file (safetensors) or an average cannot."""
    return {name: value for name, value in state.items() if torch.is_tensor(value)}


def untied(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`state`'s tensors (no module's extra state) with each tensor once, under its first
    name (`tied_groups`), as safetensors stores tied weights."""
    return {names[0]: state[names[0]] for names in tied_groups(state)}


def tied_groups(state: dict[str, Any]) -> list[list[str]]:
    """A state dict's tensor names grouped by the tensor they name: tied weights (one
    tensor under several names: the same memory seen the same way) are one group."""
    groups: dict[Any, list[str]] = {}
    for name, tensor in tensor_entries(state).items():
        groups.setdefault(_view(tensor), []).append(name)
    return list(groups.values())


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)


def _view(tensor: torch.Tensor) -> Any:
    """What makes two entries one tensor: their memory, offset, dtype, shape and strides
    (an empty tensor is only itself)."""
    return (_storage(tensor), tensor.storage_offset(), tensor.dtype, tensor.shape, tensor.stride())


def load_safetensors(model: torch.nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load safetensors weights into `model`, tied weights from any one of their names;
    nothing is unpickled. With `strict`, a tensor of the model the file lacks, or a name
    the model lacks, is a `ValueError` naming them (a module's extra state is not in such
    a file and is left as it is)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"weights file {str(path)!r} is truncated or corrupt ({error})"
        ) from None
    state = model.state_dict()
    missing = [g[0] for g in tied_groups(state) if not any(name in weights for name in g)]
    unexpected = [name for name in weights if name not in state]
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights file {str(path)!r} does not fit the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.load_state_dict({k: v for k, v in weights.items() if k in state}, strict=False)


def load_model_weights(model: torch.nn.Module, path: str | Path, map_location: Any = "cpu") -> None:
    """Load a checkpoint's `model` weights (or a `.safetensors` file's) into `model`; a
    checkpoint of another model is a `ValueError` that says what differs (names and shapes),
    not torch's key dump."""
    if Path(path).suffix == ".safetensors":
        _load_safetensors_checked(model, Path(path), map_location)
        return
    payload = load_checkpoint_file(path, map_location=map_location)
    weights = model_weights(path, payload)
    refuse_another_models(path, model.state_dict(), weights)
    model.load_state_dict(weights)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    *,
    map_location: Any = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """A traineval checkpoint's contents (`model`, `optimizer`, `epoch`, `global_step`,
    `config`, `loop`: the counters and the history as JSON, ...), loaded with
    `weights_only` (no code runs); with `model`, its weights are also loaded into it,
    after a check that names what differs when the checkpoint is another model's, and with
    `optimizer` / `scheduler` their saved states. A `.safetensors` export holds weights
    only: it needs `model`, and the contents are `{"model": state_dict}`.

    A sharded checkpoint (written under FSDP) loads into a plain `model` in one process, or
    into an FSDP-sharded one on every rank of a job of any size (each rank reads its
    pieces); the contents then name the shard folder (`shards`) instead of holding the
    tensors. Without `model` they hold them whole.

    To resume training, pass the file to `train(resume_from=...)` instead: it restores the
    optimizer, schedule, random streams and position too.
    """
    if Path(path).suffix == ".safetensors":
        if model is None or optimizer is not None:
            raise ValueError(f"{str(path)!r} holds weights only: pass the model alone")
        _load_safetensors_checked(model, Path(path), map_location)
        return {"model": model.state_dict()}
    payload = load_checkpoint_file(path, map_location=map_location, read_shards=model is None)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a traineval checkpoint")
    if model is not None and payload.get(SHARDS) is not None:
        from . import shard_metadata, sharded

        shards = shard_folder(Path(path), payload)
        refuse_another_models(path, model.state_dict(), shard_metadata.shapes(shards))
        sharded.load_into(shards, model, optimizer)
    elif model is not None:
        _refuse_a_sharded_model(path, model)
        weights = model_weights(path, payload)
        refuse_another_models(path, model.state_dict(), weights)
        model.load_state_dict(weights)
    if optimizer is not None and model is None and payload.get(SHARDS) is not None:
        raise ValueError(
            f"{str(path)!r} is a sharded checkpoint, whose optimizer state is keyed by "
            "parameter name: pass the model too (load_checkpoint(path, model, optimizer=...))"
        )
    if optimizer is not None and payload.get(SHARDS) is None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload


def _refuse_a_sharded_model(path: Any, model: torch.nn.Module) -> None:
    from ..system.distributed import is_sharded

    if is_sharded(model):
        raise ValueError(
            f"{str(path)!r} holds full weights, and the model is sharded (FSDP): load them "
            "before training shards it, or resume with train(resume_from=...)"
        )


def model_weights(path: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint's `model` state dict; a `ValueError` naming `path` without one."""
    weights = payload.get("model")
    if not isinstance(weights, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} holds no model weights (it has {sorted(payload)[:6]}): "
            "is it a traineval checkpoint?"
        )
    return weights


def _load_safetensors_checked(model: torch.nn.Module, path: Path, map_location: Any) -> None:
    """A safetensors export (tied weights stored once) after the same fit check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"weights file {str(path)!r} is unreadable ({error})") from None
    state = model.state_dict()
    expected: dict[str, Any] = {}  # a tied alias of a stored tensor is not missing
    for names in tied_groups(state):
        stored = [name for name in names if name in weights]
        expected.update((name, state[name]) for name in stored or names[:1])
    refuse_another_models(path, expected, weights)
    load_safetensors(model, path)


OWN_CHECKPOINTS = "use one of this run's checkpoints: best, last, epoch-NNNN, final"


def refuse_another_models(
    path: Any, expected: dict[str, Any], found: dict[str, Any], advice: str = OWN_CHECKPOINTS
) -> None:
    """A `ValueError` naming how weights `found` in `path` differ from the model's
    `expected` state dict (names and shapes), with `advice`; nothing if they fit."""
    differences = weight_differences(expected, found)
    if differences:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit this run's model: {differences}; it was "
            f"written for another model ({advice})"
        )


def weight_differences(expected: dict[str, Any], found: dict[str, Any], shown: int = 3) -> str:
    """How a state dict `found` differs from the model's `expected` one, briefly ('' if not)."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    shapes = [
        f"{name} {tuple(found[name].shape)} vs the model's {tuple(expected[name].shape)}"
        for name in expected
        if name in found
        and isinstance(found[name], torch.Tensor)
        and found[name].shape != expected[name].shape
    ]
    parts = []
    for label, names in (
        ("shapes differ", shapes),
        ("missing", missing),
        ("not in the model", unexpected),
    ):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{label}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts)


FINAL_WEIGHTS = "final_model.safetensors"  # a Flower run's final global model


def flower_run_ended(run_dir: str | Path) -> bool:
    """Whether a Flower run (which writes no summary.json) reached its end: its final
    weights and its test metrics are written then."""
    folder = Path(run_dir)
    return (folder / FINAL_WEIGHTS).exists() and (folder / "evaluation" / "metrics.json").exists()


def default_checkpoint(run_dir: str | Path) -> str:
    """What `evaluate` and `predict` use unless told: the run's best checkpoint, or for a
    run that keeps none its final weights (a Flower run's), else its last checkpoint (a run
    with save_best_model=false: the weights it ended with)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "best.pt").exists():
        return "best"
    if (run_dir / FINAL_WEIGHTS).exists():
        return "final"
    return "last" if (run_dir / "checkpoints" / "last.pt").exists() else "best"


def run_checkpoint(run_dir: str | Path, checkpoint: str) -> Path:
    """The file `checkpoint` names: a path, "final" (the run's final_model.safetensors), or
    a name in `run_dir/checkpoints` ("best", "last", "epoch-0005"); a name the run does not
    have is an error listing those it has."""
    path = Path(checkpoint)
    if path.suffix:
        return path
    folder = Path(run_dir) / "checkpoints"
    path = Path(run_dir) / FINAL_WEIGHTS if checkpoint == "final" else folder / f"{checkpoint}.pt"
    if not path.exists():
        names = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
        names += ["final"] if (Path(run_dir) / FINAL_WEIGHTS).exists() else []
        has = ", ".join(names) if names else "no checkpoints"
        hint = f" (--checkpoint {names[-1] if 'last' not in names else 'last'})" if names else ""
        raise ValueError(
            f"this run has no {checkpoint!r} checkpoint in {str(folder)!r}; it has: {has}{hint}"
        )
    return path
