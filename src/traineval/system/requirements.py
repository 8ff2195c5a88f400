"""What traineval needs from its environment, checked when it is imported.

`torch>=2.10`: older releases have `weights_only` loading vulnerabilities, and traineval's
promise that a checkpoint runs no code rests on that loader. pip enforces the declared range;
this check catches a torch installed around pip (a conda or system package, a pinned image).
"""

from __future__ import annotations

import re

MINIMUM_TORCH = (2, 10)


def torch_release(version: str) -> tuple[int, ...]:
    """`"2.13.0+cpu"` -> (2, 13); `"2.10.0a0+git1234"` -> (2, 10)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def check_torch(version: str) -> None:
    """Refuse a torch older than `MINIMUM_TORCH`, in a sentence."""
    if torch_release(version) < MINIMUM_TORCH:
        needed = ".".join(map(str, MINIMUM_TORCH))
        raise ImportError(
            f"traineval needs torch>={needed}, found torch {version}: older releases can run "
            f"code while loading checkpoints (weights_only fixes). pip install 'torch>={needed}'"
        )


def _check_installed() -> None:
    """From the installed package's metadata, without importing torch (a second or more:
    `traineval --help` answers without it); a torch without metadata is imported."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        import torch

        version = torch.__version__
    check_torch(version)


_check_installed()
