"""Resolving a user's own code by import path `package.module:attribute`."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, *, field: str) -> Any:
    """Import `package.module:attribute`; errors name the config field and the path."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{field}={path!r} is invalid: expected an import path 'package.module:name'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{field}={path!r}: cannot import {module_name!r} ({error})") from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}={path!r}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj
