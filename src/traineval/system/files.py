"""Files written whole or not at all, and write failures said in one sentence.

- `atomic_write_text(path, text)`: a temp file with a unique name in the same folder,
  fsync, `os.replace`, then the folder fsynced: a reader sees the old file or the new one,
  never a part. `atomic_file(path)` gives the temp file to a writer of its own (torch.save).
- `writing(path)`: an OSError (a full disk, no permission) becomes a `WriteError` that names
  the file, its disk's free space, and whether the previous file is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def _umask() -> int:
    """This process's umask, read without setting it where Linux says it (`/proc`), else
    by setting and restoring it (which races with another thread's new files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """The mode a write of `path` leaves: the file's own where it exists (a `chmod 600`
    stays), else what `open()` gives a new file under the umask (mkstemp's is 0600). A
    symbolic link is replaced, not followed: its target's mode is not the file's."""
    try:
        if not path.is_symlink():
            return path.stat().st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~_umask()


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
        _make_folder(path)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
        temporary = Path(name)  # unique per writer: two saves never share a temp file
        try:
            yield temporary
            os.chmod(temporary, file_mode(path))  # mkstemp's (and safetensors') is 0600
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    sync_folder(path.parent)


def _make_folder(path: Path) -> None:
    """The folder of `path`, with its parents; one that is a file is named ("File exists"
    named the file to be written)."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        culprit = next(
            (p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None
        )
        if culprit is None:
            raise
        raise WriteError(
            error.errno,
            f"could not write {str(path)!r}: {str(culprit)!r} is a file, not a folder: move it "
            "away; nothing was written",
        ) from None


def sync_folder(folder: Path) -> None:
    """Make the files created or renamed in `folder` durable (where the platform allows it)."""
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


def json_records(path: str | Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each line of a JSON-lines file that holds a JSON object, as its bytes and its value;
    a line cut short by a crash, or one that is not an object (a damaged or hostile file:
    bad bytes, nesting too deep to read) is passed over."""
    with Path(path).open("rb") as handle:
        for line in handle:
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
                continue
            if isinstance(value, dict):
                yield (line if line.endswith(b"\n") else line + b"\n"), value


def atomic_write_lines(path: str | Path, lines: list[bytes]) -> Path:
    """Lines (each ending in a newline) written atomically, byte for byte."""
    with atomic_file(path) as temporary:
        temporary.write_bytes(b"".join(lines))
    return Path(path)


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's value; None when it is missing or does not parse (a run's own record,
    read to be rewritten)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
