"""The built-in models' options, checked before anything is allocated: each value against
its rule (naming `model.options.<key>`), then the model's size against this machine's
memory, counted on torch's meta device (shapes without storage)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..config.checks import boolean, fail, integer, number

MAX_WIDTH = 1 << 20  # units in one layer; wider is a typo for a model built from a config
BYTES_PER_PARAMETER = 16  # float32 weights, gradients and Adam's two moments


def _sizes(field: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        fail(field, value, f"expected a list of integers in [1, {MAX_WIDTH}]")
    for index, size in enumerate(value):
        integer(f"{field}[{index}]", size, minimum=1, maximum=MAX_WIDTH)


def _channels(field: str, value: Any) -> None:
    _sizes(field, value)
    if len(value) != 2:
        fail(field, value, "expected two channel counts, [first conv, second conv]")


def _width(field: str, value: Any) -> None:
    integer(field, value, minimum=1, maximum=MAX_WIDTH)


def _dropout(field: str, value: Any) -> None:
    number(field, value, minimum=0, below=1)


def _finite(field: str, value: Any) -> None:
    number(field, value, minimum=-math.inf)


RULES: dict[str, Callable[[str, Any], None]] = {
    "hidden_sizes": _sizes,
    "channels": _channels,
    "hidden": _width,
    "latent_dim": _width,
    "dropout": _dropout,
    "log_std_init": _finite,
}
FLAGS = ("separate", "orthogonal_init", "normalize_observations", "gaussian", "sde")
RULES.update(dict.fromkeys(FLAGS, boolean))


def check_options(options: Mapping[str, Any]) -> None:
    """Each option a built-in model takes, against its rule (unknown keys: the model's
    constructor names them)."""
    for key, value in options.items():
        if key in RULES:
            RULES[key](f"model.options.{key}", value)


def check_size(name: str, options: Mapping[str, Any], build: Callable[[], nn.Module]) -> None:
    """Refuse a model whose weights, gradients and optimizer state would not fit in this
    machine's memory, counting its parameters on the meta device (nothing allocated)."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in build().parameters())
    except (NotImplementedError, RuntimeError):
        return  # an initialiser the meta device lacks: the options passed their rules
    need, memory = count * BYTES_PER_PARAMETER, physical_memory()
    if memory is not None and need > memory:
        raise ValueError(
            f"model.options={dict(options)!r} make a {name!r} model of {count:,} parameters: "
            f"about {need / 2**30:,.0f} GiB for its weights, gradients and optimizer state, "
            f"more than this machine's {memory / 2**30:,.0f} GiB of memory; choose smaller sizes"
        )


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
