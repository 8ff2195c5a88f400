"""How a command ends, as its exit status: 0 done, 2 bad input, 1 a fault of the
environment or of the run, 128+N a signal (130 Ctrl-C, 143 SIGTERM: what schedulers requeue);
and the one line that says why (`error_line`).

Scripts and schedulers branch on it: a 2 will fail the same way again until the input is
fixed; a 1 may pass on another machine or after freeing disk; a 128+N is resumable."""

from __future__ import annotations

import errno

BAD_INPUT = 2
FAULT = 1


class UserCodeError(ValueError):
    """The user's own code (a metric's function, update or compute) raised: it fails the
    same way on every machine until that code changes (`BAD_INPUT`, also where it ends a
    training run's validation)."""


class StepOutputError(UserCodeError, TypeError):
    """A training step returned what the loop cannot train on (not a StepOutput, a loss
    that is not a scalar tensor or carries no graph): the step's code must change."""


_USER_PATHS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
_USER_PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL)  # a name the user chose


def exit_status_of(error: BaseException) -> int:
    """A reported error's exit status: `FAULT` for the environment or the run (a disk, a
    permission, a run directory in use, a diverged run, a lost tune worker), `BAD_INPUT`
    for what the user gave (a value, a file, a checkpoint, a code reference, a metric of
    theirs that raised)."""
    from ..runs.rundir import RunDirInUse
    from .steplog import NonFiniteError
    from .stop_rules import EvaluationError

    if isinstance(error, EvaluationError) and error.user_code:
        return BAD_INPUT  # a metric of theirs raised: it will again
    if isinstance(error, (RunDirInUse, NonFiniteError, EvaluationError)):
        return FAULT
    if isinstance(error, OSError) and not (
        isinstance(error, _USER_PATHS) or error.errno in _USER_PATH_ERRNOS
    ):
        return FAULT  # WriteError, PermissionError, a full disk, a lost tune worker
    return BAD_INPUT


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message ('' for none)."""
    return (str(error).strip().splitlines() or [""])[0]


def failure_line(error: BaseException) -> str:
    """`first_line`, after the error's type but for a ValueError (whose message says what
    was wrong): how a failed evaluation names its cause."""
    said = first_line(error)
    return said if isinstance(error, ValueError) else f"{type(error).__name__}: {said}"


def error_line(error: BaseException) -> str:
    """`error` in one line. torch re-raises an error of a DataLoader worker with the
    worker's whole traceback in its message: the line is the original error's own, naming
    the worker."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        where = lines[0].removeprefix("Caught ").rstrip(".").partition(" in ")[2]
        said = lines[-1].removeprefix(f"{type(error).__name__}: ")
        return f"{said} (in {where})" if where else said
    return text
