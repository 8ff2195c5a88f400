"""The run directory as a resource: unique default names, one run at a time (a lock that a
killed run does not leave stuck), and files written whole or not at all.

- `default_run_dir("run")` is `runs/run-<date>-<time>-<random>`: two runs started in the same
  second get different folders.
- `run_dir_lock(folder)` holds an exclusive lock on `<folder>/.lock` for the duration of a
  run; a second run on the folder (another process, or another thread of this one) is
  refused with `RunDirInUse`, naming the holder. The operating system releases the lock when
  the holding process ends in any way (SIGKILL included), so a crashed run never leaves the
  folder locked. Re-entrant within one thread (`run_experiment` holds it around
  `TrainingManager.train`, which takes it too).
- `atomic_write_text(path, text)`: a temp file with a unique name in the same folder,
  fsync, `os.replace`; a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no fcntl; runs are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

_held: dict[Path, list[Any]] = {}  # folder -> [thread, descriptors, depth]: this process's runs
_guard = threading.Lock()


class RunDirInUse(FileExistsError):
    """Another run holds the run directory."""


class WriteError(OSError):
    """A file of the run could not be written (a full disk, no permission); the previous
    version of the file, if any, is intact."""

    def __str__(self) -> str:
        return str(self.strerror)  # the sentence, without "[Errno 28]" before it


@contextlib.contextmanager
def writing(path: Path, library_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Say an OSError of the block, or one of a writing library's `library_errors` (torch's
    zip writer, safetensors: they say "unexpected pos 750208 vs 750096" for a full disk), as
    one sentence naming `path` and its disk's free space (no chained traceback)."""
    caught: tuple[type[BaseException], ...] = (OSError, *library_errors)
    try:
        yield
    except WriteError:
        raise
    except caught as error:
        code = error.errno if isinstance(error, OSError) else errno.EIO
        reason = (error.strerror if isinstance(error, OSError) else None) or _first_line(error)
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise WriteError(
            code, f"could not write {str(path)!r}: {reason}{_free_space(path)}; {kept}"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__  # torch's last line says what failed


def _free_space(path: Path) -> str:
    """`" (N MB free on its disk)"`, or nothing where that cannot be read."""
    folder = next((p for p in (path.parent, *path.parents) if p.is_dir()), None)
    try:
        free = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        return ""
    return "" if free is None else f" ({free / 2**20:,.0f} MB free on its disk)"


def default_run_dir(prefix: str = "run", root: str | Path = "runs") -> Path:
    """`runs/<prefix>-YYYYmmdd-HHMMSS-<6 hex>`: sortable by time, unique per call."""
    return Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def atomic_file(
    path: str | Path, library_errors: tuple[type[BaseException], ...] = ()
) -> Iterator[Path]:
    """A temp file of its own beside `path` for the block to write; when the block ends it
    is fsynced and renamed over `path` (then the folder is fsynced), when the block fails it
    is removed: a reader sees the old file or the new one, never a part. An OSError is said
    as a `WriteError` naming `path` (so are the block's `library_errors`, see `writing`).
    Every file of a run is written through this."""
    path = Path(path)
    with writing(path, library_errors):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
        temporary = Path(name)  # unique per writer: two saves never share a temp file
        try:
            yield temporary
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_file`): a crash or a full disk leaves
    the previous file, never a truncated one."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, value: object) -> Path:
    """`value` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2))


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's value; None when it is missing or does not parse (a run's own record,
    read to be rewritten)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# A run's config.yaml opens with RUN_CONFIG_HEAD and closes with RUN_CONFIG_END: a copy cut
# short at a line boundary is still valid YAML, and would silently read its lost settings
# as defaults (`config.load_yaml` refuses one with the head and without the end).
RUN_CONFIG_HEAD = "# written by traineval: a run's settings; its last line is "
RUN_CONFIG_END = "# end of config.yaml"


def write_run_config(record: dict[str, Any], output_dir: str | Path) -> Path:
    """A run config's sections (`RunConfig.to_dict()`) as `output_dir/config.yaml`, with
    `training.output_dir` naming that folder (the record itself is not changed), between
    the head and end lines that let a reader tell a complete file from a cut one."""
    record = {**record, "training": {**record["training"], "output_dir": str(output_dir)}}
    return atomic_write_text(Path(output_dir) / "config.yaml", run_config_text(record))


def run_config_text(record: dict[str, Any]) -> str:
    """`record` as YAML between the head and end lines (see RUN_CONFIG_HEAD): for every run
    config traineval writes (a run's config.yaml, a study's best_config.yaml)."""
    import yaml

    text = yaml.safe_dump(record, sort_keys=False)
    return f"{RUN_CONFIG_HEAD}'{RUN_CONFIG_END}'\n{text}{RUN_CONFIG_END}\n"


def cut_run_config(text: str) -> bool:
    """Whether `text` is a run's config.yaml (it opens with the head line) whose end line is
    missing: the file was cut short."""
    if not text.startswith(RUN_CONFIG_HEAD):
        return False
    return all(line.rstrip() != RUN_CONFIG_END for line in text.splitlines())  # CRLF too


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
