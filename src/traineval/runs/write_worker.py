"""The checkpoint writer process: writes the files it is handed from shared memory, without
torch.

The training process (`runs.checkpoint_process`) copies the state into an arena of shared
memory and plans each file where torch is (`runs.file_plans`): a checkpoint as `torch.save`'s
records, a safetensors file as its header and tensors, each tensor named by its offset in
the arena. This process maps the arena and writes the files as a synchronous save would
(temp file, fsync, rename: a kill -9 at any moment leaves the previous file loadable). It
imports the standard library and nothing that imports torch: it starts in tens of
milliseconds and takes no CPU for an import while training runs (importing torch takes
about two seconds of CPU).

A job arrives over a pipe: `{"job": n, "size": arena bytes, "writes": [(format, path,
plan)]}` with format "torch" (`runs.torch_zip.write_archive`) or "bytes" (the parts in
order). The arena's first bytes are a control word: the number of a job to stop
(`ProcessWriter.supersede`); it is read before each file, each record and the fsync, the
previous file is left in place and the reply is `STOPPED` (never once a file of the job
has landed). The process ignores SIGINT and SIGTERM (the training process decides what a
signal means, and its last checkpoint still has to be written), exits when the training
process closes the pipe, and dies with it when it is killed.

    python -m traineval.runs.write_worker ARENA_FD JOBS_FD REPLIES_FD PARENT_PID
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..system.files import WriteError, atomic_file
from .torch_zip import Source, Stopped, buffer_slice, write_archive

HEADER = struct.Struct("<Q")  # a message's length
JOB = struct.Struct("<Q")  # the arena's control word: the number of a job to stop
STOPPED = "stopped"  # the reply to a job stopped by `ProcessWriter.supersede`


def write_job(job: dict[str, Any], arena_fd: int) -> tuple[bool, Any]:
    """Write a job's files; the reply (`STOPPED` when asked to stop)."""
    mapping = mmap.mmap(arena_fd, job["size"], prot=mmap.PROT_READ)
    landed = False

    def stop(nbytes: int = 0) -> bool:
        """Whether to stop now (never once a file of the job has landed: best.safetensors
        and best.pt go together)."""
        return not landed and JOB.unpack_from(mapping, 0)[0] == job["job"]

    try:
        for form, path, plan in job["writes"]:
            if stop():
                return True, STOPPED
            _write_file(form, Path(path), plan, mapping, stop)
            landed = True
        return True, ""
    except Stopped:
        return True, STOPPED  # the previous file stays; a newer save replaces it


def _write_file(
    form: str, path: Path, plan: Any, mapping: mmap.mmap, stop: Callable[[int], bool]
) -> None:
    """One file, atomically (`atomic_file`); `stop` asked before each record and the fsync."""
    with atomic_file(path) as temporary, temporary.open("wb") as handle:
        if form == "torch":
            write_archive(handle, path.stem, plan["records"], mapping,
                          options=plan["options"], stop=stop)  # fmt: skip
        else:
            _write_parts(handle, plan, mapping, stop)
        if stop(0):  # before the fsync, most of a write's time
            raise Stopped(str(path))


def _write_parts(handle: Any, parts: list[Source], mapping: mmap.mmap, stop: Any) -> None:
    view = memoryview(mapping)
    for part in parts:
        data = part if isinstance(part, bytes) else buffer_slice(view, part)
        if stop(len(data)):
            raise Stopped("a part")
        handle.write(data)


def _die_with(parent: int) -> None:
    """End this process when the training process dies (a kill -9 takes the writer with it,
    as it would a thread: the file in hand stays a temp file, the previous one loadable, and
    no write lands after a resumed run has started)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def serve(arena_fd: int, jobs_fd: int, replies_fd: int, parent: int) -> None:
    """The writer process's loop: one job at a time, a reply for each, until EOF."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with os.fdopen(jobs_fd, "rb") as jobs, os.fdopen(replies_fd, "wb") as replies:
        while True:
            header = jobs.read(HEADER.size)
            if len(header) < HEADER.size or HEADER.unpack(header)[0] == 0:
                return  # the training process is done (a stop, or EOF: it is gone)
            job = pickle.loads(jobs.read(HEADER.unpack(header)[0]))
            try:
                reply: tuple[bool, Any] = write_job(job, arena_fd)
            except WriteError as error:  # its sentence names the file: raised as it is
                reply = (False, (error.errno, error.strerror))
            except BaseException as error:  # reported to the training process
                reply = (False, f"{type(error).__name__}: {error}")
            message = pickle.dumps(reply)
            replies.write(HEADER.pack(len(message)) + message)
            replies.flush()


if __name__ == "__main__":
    serve(*(int(arg) for arg in sys.argv[1:5]))
