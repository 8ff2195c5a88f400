"""Shard folders by name: how a sharded checkpoint's file names its folder, finding that
folder (refusing a name that leads elsewhere) and removing the ones no save needs any more.
Nothing here imports torch.distributed.checkpoint (`traineval.runs.sharded` reads and writes
the folders' contents)."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path
from typing import Any

from .errors import CheckpointError

SHARDS = "shards"  # a checkpoint file's entry naming its shard folder
SHARDED_PARTS = ("model", "optimizer")  # what the shard folder holds, under these keys
MARK = ".shards-"  # `{name}{MARK}<id>`: a shard folder's name


def folder_name(name: str, token: str) -> str:
    """The shard folder of checkpoint `name`, told apart from its earlier ones by `token`."""
    return f"{name}{MARK}{token}"


# `best.at-resume-point.pt`: the best up to a max_steps stop's resume point, kept while its
# closing evaluation's best is `best.pt` (`run_checkpoints.keep_best_at_resume_point`); its
# shards are a copy of the folder it names, under its own name with the same id
AT_RESUME_POINT = ".at-resume-point"


def keeps_shards_in(named: Any, folder: str) -> bool:
    """Whether a checkpoint file whose shards entry is `named` keeps its shards in the
    folder called `folder`: the one it names or, for a best kept at a resume point, that
    folder's copy (`AT_RESUME_POINT`)."""
    if named == folder:
        return True
    kept = (owner(folder) or "").endswith(AT_RESUME_POINT) and isinstance(named, str)
    return kept and named.rpartition(MARK)[2] == folder.rpartition(MARK)[2]


def remove_older(folder: Path, name: str, keep: str | None) -> None:
    """Delete the shard folders of checkpoint `name` except `keep` (the one `{name}.pt`
    names now): those of earlier saves, and any a killed save left half written."""
    for path in folder.glob(f"{glob.escape(name)}{MARK}*"):
        if path.name != keep and owner(path.name) == name:
            remove(path)


def owner(folder: str) -> str | None:
    """The checkpoint whose shard folder is called `folder` (`{name}{MARK}<id>`), or None."""
    name, mark, token = folder.rpartition(MARK)
    return name if mark and name and token.isalnum() else None


def remove(path: Path) -> None:
    """Delete a shard folder (a link in its place: the link alone)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def shard_folder(path: Path, payload: dict[str, Any]) -> Path:
    """The shard folder a loaded checkpoint file at `path` names; a `CheckpointError` when
    the name is not a folder beside it, or the folder is gone."""
    name = payload.get(SHARDS)
    if not isinstance(name, str) or MARK not in name or Path(name).name != name:
        raise CheckpointError(
            f"checkpoint {str(path)!r} names its shards {name!r}: not a shard folder beside it "
            f"(expected a name like 'last{MARK}1a2b3c4d')"
        )
    shards = path.resolve().parent / name  # beside the file, also one reached by a link
    if not (shards / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} keeps its model and optimizer in the folder {name!r} "
            "beside it, which is missing or incomplete (copy that folder with the file)"
        )
    return shards
