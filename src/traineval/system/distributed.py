"""Data-parallel training on torch.distributed: the process group, loaders, and collectives.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) `setup` joins the process
group (NCCL on CUDA, gloo on CPU) and pins the process to its device. `Distributed` is what
the rest of the library sees: the rank and world size, and the few collectives the loop and
the evaluator need. A single process gets `Distributed()`, whose collectives do nothing, so
no code path branches on "is this distributed" beyond asking `is_main`.

Batch sizes are per process: with N ranks, `batch_size` b and accumulation k, one optimizer
update sees N * b * k samples, and its gradient equals that of one batch of them (fp32).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:  # the loader sharding of earlier versions: data.sharding
    from .moved_modules import moved_name

    return moved_name(__name__, name)


ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""


@contextlib.contextmanager
def _collective(job: Distributed, what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # gloo / NCCL errors, timeouts included
        raise _failed(job, what, error) from error


def _failed(job: Distributed, what: str, error: BaseException) -> CollectiveError:
    return CollectiveError(
        f"rank {job.rank} of {job.world_size}: {what} failed ({error}); another rank "
        "probably failed or stopped answering (each wait is bounded by "
        "distributed_timeout_seconds)"
    )


# words of a gloo or NCCL error: a collective inside torch's own code (DDP's gradient
# all-reduce, FSDP's gathers) failed because another rank did
_TRANSPORT_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe")


@contextlib.contextmanager
def collectives_inside(job: Distributed, what: str) -> Iterator[None]:
    """Run code whose collectives torch makes (DDP's backward, FSDP's forward): a transport
    error there is a `CollectiveError` naming `what` and that another rank probably failed
    (it reached the user as a bare gloo RuntimeError); other errors pass as they are."""
    try:
        yield
    except RuntimeError as error:
        said = str(error).lower()
        if job.enabled and any(word in said for word in _TRANSPORT_WORDS):
            raise _failed(job, what, error) from error
        raise


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job; collectives are no-ops for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and progress."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum each value over the ranks (float64); the same list on every rank."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
        with _collective(self, "summing values over the ranks"):
            dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, value: int | torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks, as a float32 tensor on the communication device."""
        tensor = torch.as_tensor(value, dtype=torch.float32)
        if not self.enabled:
            return tensor
        tensor = tensor.to(_comm_device(), copy=True)
        with _collective(self, "summing the window's items over the ranks"):
            dist.all_reduce(tensor)
        return tensor

    def sum_in_place(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Sum each tensor over the ranks, in place, with one all-reduce of them flattened
        per wire dtype (float32 on the communication device; float64 and complex tensors
        keep their precision, a complex one as its real and imaginary parts); `what` names
        it in a collective's error."""
        if not self.enabled or not tensors:
            return
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault(_wire_dtype(t), []).append(t)
        for dtype, group in groups.items():
            parts = [_as_real(t).reshape(-1).to(dtype) for t in group]
            flat = torch.cat(parts).to(_comm_device())
            with _collective(self, what):
                dist.all_reduce(flat)
            offset = 0
            for t, part in zip(group, parts, strict=True):
                summed = flat[offset : offset + part.numel()]
                t.copy_(torch.view_as_complex(summed.view(*t.shape, 2)) if t.is_complex() else
                        summed.view_as(t))  # fmt: skip
                offset += part.numel()

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average `params`' gradients over the ranks in place (one all-reduce), as DDP does,
        for modes whose step cannot run through a DDP wrapper (several forward passes per
        backward, functional calls). A missing gradient counts as zeros."""
        if not self.enabled or not params:
            return
        grads: list[torch.Tensor] = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.sum_in_place(grads, "averaging gradients over the ranks")
        torch._foreach_div_(grads, self.world_size)

    def broadcast_weights(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (what DDP does when it wraps)."""
        if not self.enabled:
            return
        with torch.no_grad(), _collective(self, "broadcasting rank 0's weights"):
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes; every rank gets the same answer."""
        return bool(self.sum([1.0 if flag else 0.0])[0]) if self.enabled else flag

    def gather(self, obj: Any, group: Any = None) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank (through process
        group `group`; None: the default one)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        with _collective(self, "gathering state from the ranks"):
            dist.all_gather_object(gathered, obj, group=group)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            with _collective(self, "waiting for the other ranks (barrier)"):
                dist.barrier()


def _wire_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a tensor is summed in over the ranks: float64 for float64 and complex128,
    else float32."""
    wide = tensor.dtype in (torch.float64, torch.complex128)
    return torch.float64 if wide else torch.float32


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_environment() -> Distributed:
    """The job torchrun describes in the environment (a single process when it says nothing)."""
    values = {key: os.environ.get(key) for key in ENV_KEYS}
    if values["WORLD_SIZE"] is None:
        return Distributed()
    try:
        rank, world = int(values["RANK"] or 0), int(values["WORLD_SIZE"] or 1)
        local = int(values["LOCAL_RANK"] or 0)
    except ValueError:
        raise ValueError(
            f"the torchrun environment is malformed: {values}; expected integers"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"the torchrun environment is inconsistent: {values}")
    return Distributed(rank, world, local)


def setup(device: str, backend: str, timeout_seconds: float) -> tuple[Distributed, str]:
    """Join the process group torchrun describes; return the job and this rank's device.

    `device` is the config's choice ("auto", "cpu", "cuda", ...): with CUDA each rank takes
    `cuda:LOCAL_RANK`. A process group the caller already initialised is used as it is.
    `timeout_seconds` bounds every collective, so a rank that dies or hangs stops the others
    with an error instead of a silent hang.
    """
    if dist.is_available() and dist.is_initialized():
        job = Distributed(dist.get_rank(), dist.get_world_size(), _local_rank())
        return job, _rank_device(device, job)
    job = from_environment()
    if not job.enabled:
        return job, device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank_device = _rank_device(device, job)
    chosen = backend
    if chosen == "auto":
        chosen = "nccl" if rank_device.startswith("cuda") else "gloo"
    if chosen == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ValueError(
            "distributed_backend='nccl' needs CUDA GPUs and a PyTorch build with NCCL; "
            "use 'gloo' (CPU) or 'auto'"
        )
    if chosen == "gloo" and not dist.is_gloo_available():
        raise ValueError("distributed_backend='gloo' is not available in this PyTorch build")
    if rank_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rank_device))
    dist.init_process_group(
        backend=chosen,
        timeout=datetime.timedelta(seconds=timeout_seconds),
        device_id=torch.device(rank_device) if chosen == "nccl" else None,
    )
    atexit.register(_destroy)
    logger.info(
        "rank %d of %d (local rank %d) on %s, backend %s",
        job.rank,
        job.world_size,
        job.local_rank,
        rank_device,
        chosen,
    )
    return job, rank_device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _rank_device(device: str, job: Distributed) -> str:
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return "cpu" if device == "auto" else device
    if not torch.cuda.is_available():
        return device  # resolve_device falls back to the CPU with a warning
    if ":" in device:
        raise ValueError(
            f"device={device!r} names one GPU, but under torchrun each rank takes "
            f"cuda:LOCAL_RANK; set device to 'cuda' (or 'auto'), and choose the GPUs "
            "with CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if job.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={job.local_rank} but this node has {count} CUDA device(s); "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return f"cuda:{job.local_rank}"


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: torch.nn.Module, device: torch.device, job: Distributed, config: Any
) -> tuple[torch.nn.Module, Callable[[], AbstractContextManager[Any]] | None]:
    """The module the loop trains through, and its "skip the gradient sync" context.

    A single process trains `model` itself. With DDP the returned wrapper shares `model`'s
    parameters. With FSDP `model` is sharded in place (its parameters become DTensors), so
    build the optimizer after this call; read full weights with `model_state`.
    """
    if not job.enabled:
        return model, None
    if config.distributed_strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        job.broadcast_weights(model)  # rank 0's initial weights everywhere, as DDP does
        for unit in _shard_units(model, config.fsdp_shard_modules):
            fully_shard(unit)
        fully_shard(model)
        return model, functools.partial(_fsdp_no_sync, model)
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=config.find_unused_parameters,
    )
    return ddp, ddp.no_sync


def _shard_units(model: torch.nn.Module, class_names: Sequence[str]) -> list[torch.nn.Module]:
    """The submodules FSDP shards on their own: the named classes, else each block of every
    ModuleList (a transformer's layers)."""
    if class_names:
        units = [m for m in model.modules() if type(m).__name__ in class_names and m is not model]
        if not units:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"fsdp_shard_modules={list(class_names)} matched no submodule; the model's "
                f"module classes are: {', '.join(present)}"
            )
        return units
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return [block for blocks in lists for block in blocks]


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP sharded `model` (`fully_shard` made it or a submodule an FSDPModule)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def reshard(model: torch.nn.Module) -> None:
    """Return an FSDP model to its sharded state. An evaluation pass leaves the root unit's
    parameters gathered (no backward pass runs to reshard them), and a full state dict
    taken in that state is unusable, so `model_state` and `optimizer_state` reshard first."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


@contextlib.contextmanager
def no_initializing_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Read an optimizer's state through torch.distributed.checkpoint without its
    "initializing" step: for an optimizer with no state yet it calls `step()` with zero
    gradients and lr 0, which is still a step for one that counts its steps or applies a
    rate of its own (federated's server optimizer counts rounds). A save needs none: the
    optimizer's `step` does nothing meanwhile."""
    missing = object()
    before = optimizer.__dict__.get("step", missing)
    optimizer.__dict__["step"] = _no_step
    try:
        yield
    finally:
        if before is missing:
            del optimizer.__dict__["step"]
        else:
            optimizer.__dict__["step"] = before


def _no_step(closure: Any = None) -> None:
    """What `no_initializing_step` puts in place of an optimizer's `step`."""


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The model's full weights; for an FSDP model a collective (rank 0 gets them)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=_full_options())


def load_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load what `model_state` returned; for an FSDP model a collective in which rank 0's
    full weights are sent to the others, each keeping its shard (the others' `state` may be
    empty)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)


def side_group(job: Distributed, timeout_seconds: float) -> Any:
    """A gloo process group of every rank, for collectives run beside training's (a
    background checkpoint write's: two threads never share a group); None for a single
    process. A collective: every rank makes it, at the same point."""
    if not job.enabled:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))


def local_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's part of an FSDP model's weights, copied to the host: each sharded
    tensor's local shard, any other entry whole. No collective: no rank gathers the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    return {
        key: local_part(value).detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        for key, value in get_model_state_dict(model).items()
    }


def load_local_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Put back what `local_model_state` took, each rank its own shards, and the modules'
    extra state (`set_extra_state`). No collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    with torch.no_grad():
        for key, value in get_model_state_dict(model).items():
            if torch.is_tensor(value):
                local_part(value).copy_(state[key])
    set_extra_states(model, state)


def set_extra_states(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Give each module its extra state (`set_extra_state`) from the `_extra_state`
    entries of `state` (a state dict, or any part of one)."""
    for key, value in state.items():
        if key == "_extra_state" or key.endswith("._extra_state"):
            owner = key.removesuffix("_extra_state").removesuffix(".")
            model.get_submodule(owner).set_extra_state(value)


def as_sharded(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`local_model_state`'s shards as tensors sharded like the model's (`sharded_like`: no
    copy to the device, no collective), for torch.distributed.checkpoint to save or load
    into; the other entries as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    out = dict(state)
    for key, value in get_model_state_dict(model).items():
        if torch.is_tensor(value):
            out[key] = sharded_like(value, state[key])
    return out


def sharded_like(template: Any, local: torch.Tensor) -> torch.Tensor:
    """`local`, a shard of a tensor sharded like `template` (a DTensor), as a DTensor of
    `template`'s spec around `local` itself (`from_local` would move a host shard to the
    device); `local` as it is where `template` is not sharded."""
    spec = getattr(template, "_spec", None)
    if spec is None:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor(local, spec, requires_grad=False)


def empty_places(model: torch.nn.Module) -> dict[str, Any]:
    """Places for a saved copy of `model`'s weights to be read into (by
    torch.distributed.checkpoint): an empty host tensor for each tensor entry, sharded like
    it (this rank's part), the other entries (extra state) as they are. No collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    return {
        key: sharded_like(value, torch.empty_like(local_part(value), device="cpu"))
        if torch.is_tensor(value)
        else value
        for key, value in get_model_state_dict(model).items()
    }


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of it); any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state; for an FSDP model keyed by parameter name, a collective."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    with no_initializing_step(optimizer):
        return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what `optimizer_state` returned (every rank passes the full state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
