"""The run directory as a resource: unique default names and one run at a time (a lock that
a killed run does not leave stuck). Its files are written whole or not at all
(`traineval.system.files`).

- `default_run_dir("run")` is `runs/run-<date>-<time>-<random>`: two runs started in the same
  second get different folders.
- `run_dir_lock(folder)` holds an exclusive lock on `<folder>/.lock` for the duration of a
  run; a second run on the folder (another process, or another thread of this one) is
  refused with `RunDirInUse`, naming the holder. The operating system releases the lock when
  the holding process ends in any way (SIGKILL included), so a crashed run never leaves the
  folder locked. Re-entrant within one thread (`run_experiment` holds it around
  `TrainingManager.train`, which takes it too).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# kept where earlier versions had them: files written whole (system.files) and the run
# config's text (config.config_file)
from ..config.config_file import (  # noqa: F401
    RUN_CONFIG_END,
    RUN_CONFIG_HEAD,
    cut_run_config,
    run_config_text,
    write_run_config,
)
from ..system.distributed import Distributed
from ..system.files import (  # noqa: F401
    WriteError,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    read_json_or_none,
    writing,
)
from . import overwrite as overwrite_outputs
from .checkpoint import remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no fcntl; runs are not locked there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CV_SUMMARY = "cv_summary.json"  # a cross-validation's folder holds it, beside its folds
CV_PLAN = "cv_plan.json"  # how its rows were folded, and the config: a resume's reference

_held: dict[Path, list[Any]] = {}  # folder -> [thread, descriptors, depth]: this process's runs
_guard = threading.Lock()


class RunDirInUse(FileExistsError):
    """Another run holds the run directory."""


def default_run_dir(prefix: str = "run", root: str | Path = "runs") -> Path:
    """`runs/<prefix>-YYYYmmdd-HHMMSS-<6 hex>`: sortable by time, unique per call."""
    return Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def is_cross_validation(folder: str | Path) -> bool:
    """Whether `folder` is a cross-validation's (`traineval cv`, `Evaluator.cross_validate`),
    finished or stopped: its folds are runs of their own, it is none."""
    return (Path(folder) / CV_SUMMARY).is_file() or (Path(folder) / CV_PLAN).is_file()


def holds_cross_validation(folder: Path) -> bool:
    """Whether `folder` holds a cross-validation, finished or begun (its plan, summary or
    a fold with checkpoints)."""
    return is_cross_validation(folder) or any(folder.glob("fold-*/checkpoints/*"))


def holds_training_run(folder: Path) -> bool:
    """Whether `folder` holds a run of its own (checkpoints, or a summary of one)."""
    checkpoints = folder / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (
        (folder / "summary.json").is_file() and not (folder / CV_SUMMARY).is_file()
    )


@contextlib.contextmanager
def run_dir_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for one run (creating it); `RunDirInUse` if another run holds it."""
    folder = Path(folder)
    make_folder(folder)
    key, me = folder.resolve(), threading.get_ident()
    with _guard:
        entry = _held.get(key)
        if entry is not None and entry[0] != me:
            raise RunDirInUse(
                f"output_dir={str(folder)!r} is in use by another run of this process "
                f"(thread {entry[0]}): wait for it to finish, or choose another output_dir"
            )
        if entry is None:
            entry = _held[key] = [me, _acquire(folder), 0]
        entry[2] += 1
    try:
        yield
    finally:
        with _guard:
            entry[2] -= 1
            if entry[2] == 0:
                del _held[key]
                _release(entry[1])  # the lock file stays (removing it races)


def held_here(folder: str | Path) -> bool:
    """Whether a run of this process holds `folder` (`run_dir_lock`)."""
    with _guard:
        return Path(folder).resolve() in _held


def in_use(folder: str | Path) -> bool:
    """Whether a run holds `folder` now (its flock on the folder). The probe takes a shared
    lock for an instant and drops it: a run starting in that instant would be told the
    folder is in use."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # (closing drops the probe's lock)
    return False


def make_folder(folder: Path) -> None:
    """Create the run directory `folder` (and its parents), saying why it cannot be."""
    if folder.is_symlink() and not folder.exists():
        raise ValueError(
            f"output_dir={str(folder)!r} is a symbolic link to {os.readlink(folder)!r}, which "
            "does not exist: create its target, remove the link, or choose another output_dir"
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir={str(folder)!r} is a file, not a folder: choose another")
    folder.mkdir(parents=True, exist_ok=True)


def _acquire(folder: Path) -> tuple[int, int]:
    """Descriptors holding `folder` (-1 where none): `<folder>/.lock` under an exclusive
    POSIX lock, which records the holder, and the folder itself under flock, which holds
    even when someone deletes `.lock` (a second run would lock a new file of that name).

    A POSIX lock belongs to this process alone: forked DataLoader workers do not inherit
    it, and a forked child closes its copy of the folder's descriptor at once (see
    `_close_in_child`), so a killed run's lingering workers never hold the folder."""
    if fcntl is None:
        return -1, -1
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    folder_fd = _lock_folder(folder)
    for _ in range(20):  # a `report` probing the folder (`in_use`) holds it for an instant
        if folder_fd != BUSY:
            break
        time.sleep(0.01)
        folder_fd = _lock_folder(folder)
    held = folder_fd != BUSY
    if held:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held = False
    if not held:
        _release((fd, folder_fd))
        raise RunDirInUse(
            f"output_dir={str(folder)!r} is in use by another run ({_holder(path)}): wait for "
            "it to finish, or choose another output_dir"
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, folder_fd


BUSY = -2  # `_lock_folder`: another run holds the folder


def _lock_folder(folder: Path) -> int:
    """A descriptor of `folder` under an exclusive flock; `BUSY`; or -1 where the file
    system cannot flock a folder (some network file systems: the `.lock` file still holds)."""
    assert fcntl is not None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        return BUSY if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else -1
    _folder_fds.add(fd)
    return fd


def _release(fds: tuple[int, int]) -> None:
    """Close the descriptors `_acquire` opened, which releases their locks."""
    for fd in fds:
        if fd >= 0:
            _folder_fds.discard(fd)
            os.close(fd)


_folder_fds: set[int] = set()


def _close_in_child() -> None:
    """In a forked child: drop the inherited descriptors of locked folders (a flock is
    shared by every copy of its descriptor; the parent's stays held)."""
    for fd in list(_folder_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _folder_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says."""
    try:
        record = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["started"]))
        return f"pid {record['pid']} on {record['host']}, since {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def held_by_the_job(folder: Path, job: Distributed) -> Iterator[None]:
    """Hold `folder` for a run of `job`: rank 0 takes the lock (`run_dir_lock`), every rank
    learns the answer, so a second run on the folder is refused on every rank with
    `RunDirInUse`, naming the holder."""
    stack = contextlib.ExitStack()
    refused = None
    if job.is_main:
        try:
            stack.enter_context(run_dir_lock(folder))
        except RunDirInUse as error:
            refused = str(error)
    refused = job.gather(refused)[0]
    if refused is not None:
        raise RunDirInUse(refused)
    with stack:
        yield


def claim(folder: Path, job: Distributed, *, resuming: bool, overwrite: bool) -> None:
    """Create the run directory and clear what a killed save left; refuse to write over an
    earlier run's checkpoints unless `resuming` or `overwrite` (overwrite_output_dir: then
    the earlier run's outputs are set aside, so no later resume or report takes one of them
    for this run's, and come back if this run fails before its first checkpoint:
    `traineval.runs.overwrite`)."""
    if holds_cross_validation(folder):  # its folds would stay, and point at this run
        raise FileExistsError(
            f"output_dir={str(folder)!r} holds a cross-validation (its folds, "
            f"{CV_PLAN}): a run of its own goes in another output_dir"
        )
    checkpoints = folder / "checkpoints"
    earlier = not resuming and checkpoints.is_dir() and any(checkpoints.iterdir())
    if earlier and not overwrite:
        raise FileExistsError(
            f"output_dir={str(folder)!r} already holds checkpoints of an earlier run; resume "
            "it with resume_from='auto' (CLI: --resume auto), choose another output_dir, or "
            "set overwrite_output_dir=true"
        )
    if job.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(checkpoints):
            logger.info("removed %s, left by a save that did not finish", path.name)
        moved = overwrite_outputs.set_aside(folder) if overwrite and not resuming else []
        if moved:  # an earlier run's outputs, with or without checkpoints
            logger.info(
                "overwrite_output_dir: set the earlier run's %s aside (dropped once this run "
                "has a checkpoint)",
                ", ".join(moved),
            )
    job.barrier()  # the others start once rank 0 has the directory ready


def settle_set_aside(folder: Path, job: Distributed) -> None:
    """An overwriting run killed before it settled: its earlier run's outputs come back
    unless it had written a checkpoint of its own (`traineval.runs.overwrite`)."""
    if job.is_main:
        overwrite_outputs.settle(folder, failed=True)
    job.barrier()


@contextlib.contextmanager
def overwriting(folder: Path, job: Distributed) -> Iterator[None]:
    """Around a run: the outputs an overwrite set aside are dropped when it ends, or put
    back when it fails before its first checkpoint."""
    try:
        yield
    except BaseException:
        if job.is_main:
            overwrite_outputs.settle(folder, failed=True)
        raise
    if job.is_main:
        overwrite_outputs.settle(folder, failed=False)
