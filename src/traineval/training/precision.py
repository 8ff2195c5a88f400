"""Device choice and mixed precision through `torch.amp` (autocast, and a GradScaler for fp16)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """Pick the device: CUDA, then MPS, then CPU for "auto"; an unavailable one falls back to CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%r was asked for but CUDA is not available; using the CPU", name)
        return torch.device("cpu")
    if name.startswith("cuda:"):
        _check_gpu_index(torch.device(name))
    if name == "mps" and not _mps_available():
        logger.warning("device='mps' was asked for but MPS is not available; using the CPU")
        return torch.device("cpu")
    return torch.device(name)


def make_current(device: torch.device) -> None:
    """Make a GPU named by index (`cuda:1`) the current CUDA device, so that streams, memory
    statistics and pinned copies follow it (a plain `cuda` or another kind: nothing)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _check_gpu_index(device: torch.device) -> None:
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device={str(device)!r} is invalid: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}; set device to one of them, or 'cuda'"
        )


def available_device(device: torch.device | str) -> torch.device:
    """`device` where its kind is available here, else the CPU, said as `resolve_device`
    says it ("cuda:0" on a machine without CUDA: the CPU, not torch's assertion)."""
    device = torch.device(device)
    if device.type in ("cuda", "mps") and resolve_device(device.type).type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        _check_gpu_index(device)
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclasses.dataclass
class Precision:
    """How the forward pass runs: fp32, or autocast to bf16/fp16 (fp16 with a GradScaler).

    The scaler lives as long as this object (the whole run), so its scale survives epochs.
    """

    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The forward pass's context: autocast to the chosen dtype, or nothing for fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(device_type=self.device_type, dtype=dtype)


_NO_AUTOCAST = contextlib.nullcontext()


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Turn the config's precision choice into a `Precision` for `device`.

    "auto" (`mixed_precision=False` reads as "fp32"): bf16 on CUDA where supported, else
    fp16 with a GradScaler; on CPU and MPS it stays fp32 and says so (bf16 autocast on CPU
    rarely pays off for the small models people train there; ask for precision="bf16" to
    use it anyway).
    """
    name = requested
    if requested == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
            logger.debug(  # the default: nothing the user asked for is left undone
                "mixed precision is off on %s (precision='auto'); set precision='bf16' to use "
                "bf16 autocast there",
                device.type,
            )
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name=name, device_type=device.type, scaler=scaler)


def refuse_half_weights(precision: Precision, model: torch.nn.Module) -> None:
    """fp16 mixed precision keeps float32 weights and scales the loss: a model whose trained
    weights are float16 cannot be unscaled (torch's "Attempting to unscale FP16
    gradients", after the first update's work); refused here, naming the first one."""
    if precision.scaler is None:
        return
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype == torch.float16:
            raise ValueError(
                f"precision='fp16' trains float32 weights under fp16 autocast, but the model's "
                f"{name!r} is float16: keep the model in float32 (autocast runs the forward "
                "pass in fp16), or set precision='bf16' or 'fp32'"
            )
