"""Continuing a run: find its checkpoint, check the config still fits, trim the event log."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..config.training_config import LEGACY_MODE_KEYS
from ..data.splits import SCHEMA_FILE
from ..system.files import atomic_write_lines, json_records
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint_file
from .shard_folders import SHARDS, shard_folder

logger = logging.getLogger(__name__)

# Fields that change which samples a step sees or how they are drawn: resuming with another
# value would not continue the run, it would start a different one. (A mode names its own
# such settings: `Mode.resume_fixed`.)
REFUSED_CHANGES = ("batch_size", "gradient_accumulation_steps", "seed")
# Fields that change the trajectory from here on, which a user may want. (A longer or
# shorter run, num_epochs and max_steps, changes it only where the schedule's plan depends on
# the length: `optim.restore_schedule` warns then, naming both plans.)
WARNED_CHANGES = (
    "learning_rate",
    "weight_decay",
    "momentum",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "gradient_clipping",
    "precision",
    "ema_decay",
    "ema_warmup",
    "label_smoothing",
    "class_weights",
    # when validation runs: what early stopping, a plateau schedule and best.pt see
    "eval_frequency",
    "lr_scheduler_patience",
)


# What a checkpoint must hold to be continued: a key's type, or the keys of a nested record.
# Checked before anything reads it, so a damaged or foreign file is named in one sentence.
RESUMABLE: dict[str, Any] = {
    "global_step": int,
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "config": dict,
    "loop": {"global_step": int, "epoch": int, "batch_in_epoch": int, "stopped_early": bool},
    "monitor": {"name": str, "best": object, "num_bad": int},
    "tracker": dict,
    "rng": {"python": object, "numpy": object, "torch": object},
}


def check_resumable(path: Path, payload: dict[str, Any]) -> None:
    """Refuse a checkpoint that a resume cannot read: not traineval's, or missing a part
    (`RESUMABLE`), with a `CheckpointError` naming the file and the part."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a resumable traineval checkpoint (no format "
            f"{CHECKPOINT_FORMAT!r}; it holds {sorted(map(str, payload))[:6]})"
        )
    shape = RESUMABLE
    if payload.get(SHARDS) is not None and "model" not in payload:  # in its shard folder
        shape = {k: v for k, v in RESUMABLE.items() if k not in ("model", "optimizer")}
    missing = _missing_parts(payload, shape)
    for per_rank in payload.get("rng_per_rank") or ():
        missing += _missing_parts({"rng": per_rank}, {"rng": RESUMABLE["rng"]})
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be resumed: {', '.join(missing[:4])}; it is "
            "damaged or was not written by a training run (resume from another checkpoint)"
        )


def _missing_parts(record: Any, shape: dict[str, Any], prefix: str = "") -> list[str]:
    """The parts of `record` that `shape` asks for and it lacks, or holds as another type."""
    if not isinstance(record, dict):
        return [f"{prefix.rstrip('.')} is a {type(record).__name__}, not a record"]
    found = []
    for key, kind in shape.items():
        name = f"{prefix}{key}"
        if key not in record:
            found.append(f"{name} is missing")
        elif isinstance(kind, dict):
            found += _missing_parts(record[key], kind, f"{name}.")
        elif not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            found.append(f"{name} is a {type(record[key]).__name__}, not {kind.__name__}")
    return found


def find_checkpoint(
    output_dir: Path, resume_from: str | Path
) -> tuple[Path, dict[str, Any]] | None:
    """Load the checkpoint to resume from.

    `resume_from="auto"` takes the checkpoint in `output_dir/checkpoints` that is furthest
    along by the step recorded inside it (`last.pt` on a tie; file times are not trusted: a
    copy or a backup restore changes them), skipping with a warning any that does not load,
    and says which it chose and why. It returns None when the folder holds no checkpoint,
    and raises `CheckpointError` naming the files when every one is unusable (starting over
    would overwrite them). A path must load and be resumable (`check_resumable`), or
    `CheckpointError` names it.
    """
    if str(resume_from) != "auto":
        path = Path(resume_from)
        return path, _resumable(path)
    folder = output_dir / "checkpoints"
    paths = [p for p in folder.glob("*.pt") if p.is_file()] if folder.is_dir() else []
    failures: dict[Path, str] = {}
    steps: dict[Path, int] = {}
    for path in paths:
        try:
            steps[path] = int(load_checkpoint_file(path, mmap=True).get("global_step", -1))
        except (CheckpointError, TypeError, ValueError) as error:
            failures[path] = str(error)
    ordered = sorted(steps, key=lambda p: (steps[p], p.name == "last.pt"), reverse=True)
    for path in ordered:
        try:
            payload = _resumable(path)
        except CheckpointError as error:
            failures[path] = str(error)
            continue
        _explain_choice(path, steps[path], len(paths), failures)
        return path, payload
    if failures:
        raise CheckpointError(
            f"cannot resume: every checkpoint in {str(folder)!r} is unusable ("
            + "; ".join(failures.values())
            + "); refusing to start over them. Move them away to start afresh, or resume "
            "from a copy you trust with --resume PATH (resume_from=PATH)"
        )
    return None


def set_aside_later(folder: Path, resumed: Path, step: int) -> Path | None:
    """Checkpoints in `folder` written after `step`: a resume from an earlier one (say
    epoch-0002.pt) abandons the part of the run they hold. They move, with a best's
    `.safetensors` and their shard folders, into `folder/abandoned-after-step-<step>-<time>/`,
    said in one warning: the test would otherwise score the abandoned part's best.pt and a
    later `--resume auto` jump back to it, and this run's saves would overwrite them.
    Returns that folder (None: nothing later)."""
    later: dict[Path, int] = {}
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        if not path.is_file() or path.resolve() == resumed.resolve():
            continue
        try:
            at = int(load_checkpoint_file(path, mmap=True).get("global_step", -1))
        except (CheckpointError, TypeError, ValueError):
            continue  # unreadable: not known to be later
        if at > step:
            later[path] = at
    if not later:
        return None
    aside = folder / f"abandoned-after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for path in later:
        for part in (path, path.with_suffix(".safetensors"), *folder.glob(f"{path.stem}.shards-*")):
            if part.exists():
                os.replace(part, aside / part.name)
    logger.warning(
        "resuming from %s (step %d) abandons the run's later part: its checkpoints %s are set "
        "aside in %s (this run's own are written in their place)",
        resumed.name,
        step,
        ", ".join(f"{path.name} (step {at})" for path, at in later.items()),
        aside,
    )
    return aside


def _resumable(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, checked by `check_resumable`; a sharded one's `shards`
    is its shard folder's path, checked to be there."""
    payload = load_checkpoint_file(path, read_shards=False)
    check_resumable(path, payload)
    if payload.get(SHARDS) is not None:
        from .shard_metadata import read_metadata

        shards = shard_folder(path, payload)
        read_metadata(shards)  # whole and safe (a truncated file: an older checkpoint instead)
        payload[SHARDS] = str(shards)
    return payload


def _explain_choice(path: Path, step: int, count: int, failures: dict[Path, str]) -> None:
    for skipped, reason in failures.items():
        logger.warning("skipping checkpoint %s: %s", skipped.name, reason)
    logger.info(
        "auto-resume chose %s: step %d, the furthest along of the %d checkpoint(s) in %s",
        path.name,
        step,
        count,
        path.parent,
    )


# A config-file run's data fields that decide which rows are in which split (and how they
# are read): another value on resume would train on rows the run held out for testing.
DATA_FIXED = (
    "name",
    "path",
    "target",
    "features",
    "exclude",
    "categorical",
    "task",
    "factory",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "standardize",
    "image_shape",
    "labeled_fraction",
)


def check_same_data(
    folder: Path, run_config: dict[str, Any] | None, schema: dict[str, Any] | None = None
) -> None:
    """Refuse to resume a config-file run whose data section (`DATA_FIXED`) differs from
    the one its `config.yaml` records, or whose table's rows (`schema`'s split digests, the
    new `data.json`) differ from the ones its `data.json` records."""
    _check_data_section(folder, run_config)
    from ..system.files import read_json_or_none

    saved_schema = read_json_or_none(folder / SCHEMA_FILE)
    digests = (schema or {}).get("split_digests")
    saved_digests = saved_schema.get("split_digests") if isinstance(saved_schema, dict) else None
    if None not in (digests, saved_digests) and saved_digests != digests:
        raise ValueError(
            "cannot resume: the table's rows differ from the ones this run trained on (its "
            "data.json records each split's rows; the file changed since): the resumed run "
            "would train on rows it held out; resume with the table as it was, or start a "
            "new run in another output_dir"
        )


def _check_data_section(folder: Path, run_config: dict[str, Any] | None) -> None:
    """The data fields that move rows (`DATA_FIXED`), against the run's config.yaml."""
    from ..config.training_config import load_yaml

    recorded = folder / "config.yaml"
    if run_config is None or "data" not in run_config or not recorded.is_file():
        return
    saved = load_yaml(recorded).get("data")
    if not isinstance(saved, dict):
        return  # a run of train(), or an earlier version's record: nothing to compare
    now, default = run_config["data"], object()
    changed = [
        f"data.{name}: the run's {_listed(saved.get(name))!r}, now {_listed(now.get(name))!r}"
        for name in DATA_FIXED
        if _listed(saved.get(name, default)) not in (_listed(now.get(name)), default)
    ]
    if changed:
        raise ValueError(
            "cannot resume: the data section changes which rows train, validate and test ("
            + "; ".join(changed)
            + "): the resumed run would train on rows it held out; resume with the run's "
            "data section (its config.yaml), or start a new run in another output_dir"
        )


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int, world_size: int
) -> None:
    """Refuse a resume that would change the sample order or the optimizer's parameter
    groups; warn about other trajectory changes."""
    saved = _as_written_now(saved)
    refused = [
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in REFUSED_CHANGES
        if saved.get(name) != current.get(name)
    ]
    if saved_world != world_size:
        refused.append(f"world_size: checkpoint {saved_world}, now {world_size}")
    if refused:
        raise ValueError(
            "cannot resume: the config changes how data is drawn ("
            + "; ".join(refused)
            + "); resume with the checkpoint's values or start a new run in another output_dir"
        )
    # The optimizer's saved state fits only the same optimizer over the same groups.
    grouping = [
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in ("optimizer_type", "lr_multipliers", "frozen_parameters")
        if (saved.get(name) or None) != (current.get(name) or None)
    ]
    if bool(saved.get("weight_decay")) != bool(current.get("weight_decay")):
        grouping.append(
            f"weight_decay: checkpoint {saved.get('weight_decay')!r}, now "
            f"{current.get('weight_decay')!r} (zero and non-zero decay group parameters apart)"
        )
    if grouping:
        raise ValueError(
            "cannot resume: the config changes the optimizer or its parameter groups ("
            + "; ".join(grouping)
            + "), whose saved state would not fit; resume with the checkpoint's values or "
            "start a new run in another output_dir"
        )
    for name in WARNED_CHANGES:
        if saved.get(name, current.get(name)) != current.get(name):  # older: without it
            logger.warning(
                "RESUMING WITH A CHANGED CONFIG: %s was %r in the checkpoint and is %r now; "
                "the run goes on with the new value, so it will not match an uninterrupted one",
                name,
                saved.get(name),
                current.get(name),
            )


def _as_written_now(saved: dict[str, Any]) -> dict[str, Any]:
    """An older checkpoint's config as this version writes it: `mixed_precision: false`
    (recorded beside `precision`) is precision "fp32" (`TrainingConfig._fold_precision`)."""
    if "mixed_precision" not in saved:
        return saved
    saved = dict(saved)
    if not saved.pop("mixed_precision"):
        saved["precision"] = "fp32"
    return saved


def check_mode(payload: dict[str, Any], mode: Any) -> None:
    """Refuse to resume another mode, or the same one with settings it names in
    `resume_fixed` changed (for federated runs: which clients hold which samples)."""
    saved = payload.get("mode")
    if saved is None:  # written before modes recorded themselves: flat config keys
        names = (mode.name, *getattr(mode, "aliases", ()))
        flat = {
            setting: (name, payload["config"][key])
            for key, (name, setting) in LEGACY_MODE_KEYS.items()
            if name in names and key in payload["config"]
        }
        saved = {setting: value for setting, (_, value) in flat.items()}
        if flat:  # named as the table names its mode (an alias: translated by `saved`)
            saved["name"] = next(iter(flat.values()))[0]
    saved = type(mode).saved(saved)
    if saved.get("name", mode.name) not in (mode.name, mode.to_dict()["name"]):
        raise ValueError(
            f"cannot resume: the checkpoint was trained in mode={saved['name']!r}, this run "
            f"is mode={mode.name!r}"
        )
    current = mode.settings()
    refused = [
        f"{mode.name}.{key}: checkpoint {saved[key]!r}, now {current[key]!r}"
        for key in mode.resume_fixed
        if key in saved and saved[key] != current[key]
    ]
    if refused:
        raise ValueError(
            "cannot resume: the mode's settings change how data is drawn ("
            + "; ".join(refused)
            + "); resume with the checkpoint's values or start a new run in another output_dir"
        )
    changed = [
        f"{mode.name}.{key}: checkpoint {saved[key]!r}, now {current[key]!r}"
        for key in current
        if key in saved and key not in mode.resume_fixed and saved[key] != current[key]
    ]
    if changed:  # as for the training settings: the resumed run is not the uninterrupted one
        logger.warning(
            "RESUMING WITH CHANGED MODE SETTINGS (%s): from here on the run follows them, so "
            "it will not equal an uninterrupted run with either setting",
            "; ".join(changed),
        )


def logged_records(payload: dict[str, Any]) -> int | None:
    """How many metrics.jsonl records the run had logged when the checkpoint was written
    (None: a checkpoint of an earlier version, or a value that is not a count)."""
    count = payload.get("log_records")
    return count if type(count) is int and count >= 0 else None


def truncate_events(path: Path, step: int, records: int | None = None) -> list[dict[str, Any]]:
    """Cut metrics.jsonl back to what the run had logged when its checkpoint was written
    (atomically): its first `records` records, or, for a checkpoint of an earlier version
    without the count, those up to `step`. A checkpoint written inside a step (the best
    during an epoch's validation, the last before a max_steps stop's closing validation)
    keeps none of that step's later records, which the resumed run logs again. Kept records
    stay byte for byte; unreadable lines go. Returns the records kept."""
    if not path.exists():
        return []
    kept: list[tuple[bytes, dict[str, Any]]] = []
    for line, record in json_records(path):
        if records is not None and len(kept) >= records:
            break
        at = record.get("step", 0)
        if records is not None or (isinstance(at, (int, float)) and at <= step):
            kept.append((line, record))
    atomic_write_lines(path, [line for line, _ in kept])
    return [record for _, record in kept]
