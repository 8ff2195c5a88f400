"""Resolving a user's own code by import path `package.module:attribute`, and refusing to
when the path comes from a run directory that the user has not said they trust.

A config file the user runs with `fit` may name their own code. A run directory's
`config.yaml` travels with its checkpoints (shared folders, downloads, colleagues): under
`traineval evaluate` / `predict` it is untrusted input, so no import path in it is imported
unless the user passes `--trust-code` (`trust_code=True`), in the spirit of the Hugging Face
`trust_remote_code`. Checkpoints themselves never unpickle code (see `checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: `package.module:attribute` (gymnasium ids `module:Env-v0` too): the shape of an import path.
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.\-]*$")

_UNTRUSTED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "traineval_untrusted_source", default=None
)


class UntrustedCodeError(ValueError):
    """A run directory names code to import and the user has not said they trust it."""


@contextlib.contextmanager
def untrusted(source: str, *, trust_code: bool = False) -> Iterator[None]:
    """While inside, every import path is refused (naming `source`) unless `trust_code`."""
    token = _UNTRUSTED.set(None if trust_code else source)
    try:
        yield
    finally:
        _UNTRUSTED.reset(token)


def refusal(found: Mapping[str, str], source: str) -> UntrustedCodeError:
    """The error for import paths `{field: path}` read from an untrusted `source`."""
    listed = ", ".join(f"{field}={path!r}" for field, path in found.items())
    return UntrustedCodeError(
        f"{source} names code to import ({listed}); a run directory runs only traineval's "
        "built-in names unless you trust where it came from: pass --trust-code (Python: "
        "trust_code=True)"
    )


def check_trusted(field: str, path: str) -> None:
    """Refuse to import `path` (named by config `field`) inside `untrusted(...)`."""
    source = _UNTRUSTED.get()
    if source is not None:
        raise refusal({field: path}, source)


def code_references(data: Mapping[str, Any], sections: tuple[str, ...]) -> dict[str, str]:
    """Every string in `data[section]` (nested) shaped like an import path, by dotted field."""
    found: dict[str, str] = {}

    def walk(value: Any, field: str) -> None:
        if isinstance(value, str) and IMPORT_PATH.match(value):
            found[field] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{field}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{field}[{index}]")

    for section in sections:
        walk(data.get(section), section)
    return found


def import_object(path: str, *, field: str) -> Any:
    """Import `package.module:attribute`; errors name the config field and the path."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{field}={path!r} is invalid: expected an import path 'package.module:name'"
        )
    check_trusted(field, path)
    module = _import(module_name, field, path)
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}={path!r}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


#: A run's record of the folders its code was found in (evaluate and predict search them).
CODE_PATHS_FILE = "code_paths.json"

#: Folders searched for a user's package after sys.path: the working directory, and the
#: folder of the config file being run (the CLI adds it), as users expect of a config that
#: names `my_pkg.models:build` next to it.
SEARCH_PATHS: list[str] = []


def add_search_path(folder: str | Path) -> None:
    """Let import paths find packages in `folder` (e.g. the config file's folder)."""
    resolved = str(Path(folder).resolve())
    if resolved in SEARCH_PATHS:
        SEARCH_PATHS.remove(resolved)
    SEARCH_PATHS.insert(0, resolved)  # the latest config's folder first


def _import(module_name: str, field: str, path: str) -> Any:
    """`module_name`, also from the working directory and the config's folder."""
    try:
        return _imported(module_name, field, path)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        if error.name != top:
            raise ValueError(f"{field}={path!r}: cannot import {module_name!r} ({error})") from None
    folders = [*SEARCH_PATHS, str(Path.cwd())]
    for folder in folders:
        if (Path(folder) / top).is_dir() or (Path(folder) / f"{top}.py").is_file():
            if folder not in sys.path:
                sys.path.insert(0, folder)
            try:
                return _imported(module_name, field, path)
            except ImportError as error:
                raise ValueError(
                    f"{field}={path!r}: cannot import {module_name!r} ({error})"
                ) from None
    looked = ", ".join(dict.fromkeys([folders[0], folders[-1]]))  # the config's, the cwd
    raise ValueError(
        f"{field}={path!r}: cannot import {top!r}: no module of that name on sys.path, in the "
        f"config file's folder or the working directory ({looked}); put {top} there, or add "
        "its folder to PYTHONPATH"
    )


def _imported(module_name: str, field: str, path: str) -> Any:
    """`importlib.import_module`, with an error of the module's own code (a SyntaxError, an
    exception at its top level) as a ValueError naming `field`; a module that is not found
    is for the caller to look for."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{field}={path!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error


def called(function: Any, field: str, /, **arguments: Any) -> Any:
    """`function(**arguments)` (code a config names: a data or model factory), an error of
    it said as a ValueError naming `field` (it printed bare: a path alone, torch's
    message alone)."""
    try:
        return function(**arguments)
    except Exception as error:
        said = (str(error).strip().splitlines() or [""])[0]
        name = getattr(function, "__qualname__", type(function).__name__)
        raise ValueError(f"{field}: {name}() failed: {type(error).__name__}: {said}") from error
