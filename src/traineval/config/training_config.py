"""Configuration: `TrainingConfig`, `EvaluationConfig` and the enums of the public API.

Every config is validated on construction: a bad value raises `ValueError` naming the field,
the value and what is allowed, before any work starts. Configs load from dicts and YAML and
take dotted `key=value` overrides, so the command line and files share one path.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..system import untrusted_text
from ..system.files import atomic_write_text
from . import registry
from .checks import (
    Custom,
    Flag,
    Int,
    Number,
    OneOf,
    Rule,
    SettingError,
    boolean,
    choice,
    fail,
    integer,
    number,
    subset,
)
from .code_references import IMPORT_PATH
from .conditions import CONDITION_TEXT, DURATION_TEXT, parse_condition, parse_duration
from .config_file import RUN_CONFIG_END, cut_run_config

__all__ = [
    "EvaluationConfig",
    "EvaluationMode",
    "TaskType",
    "TrainingConfig",
    "TrainingMode",
    "apply_overrides",
    "load_yaml",
]


class TaskType(Enum):
    """What the model predicts; chooses the default loss and the metric set."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    GENERATION = "generation"
    MULTILABEL = "multilabel"  # (N, C) logits, each sample may carry any set of the C labels


class TrainingMode(Enum):
    """Training modes."""

    SUPERVISED = "supervised"
    UNSUPERVISED = "unsupervised"
    SEMI_SUPERVISED = "semi_supervised"
    REINFORCEMENT = "reinforcement"
    META_LEARNING = "meta_learning"
    FEDERATED = "federated"


class EvaluationMode(Enum):
    """Evaluation modes."""

    TRAINING = "training"
    VALIDATION = "validation"
    TESTING = "testing"
    CROSS_VALIDATION = "cross_validation"
    ENSEMBLE = "ensemble"


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "step", "plateau", "onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:<index>", one GPU of several
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MONITOR_MODES = ("auto", "min", "max")
_DEFAULT_WARMUP_STEPS = 1000  # the specification's; a warmup_ratio > 0 replaces it
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding and DataLoader worker seeds take 32 bits
CLASSIFICATION_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "confusion_matrix",
    "top_k_accuracy",
    "log_loss",
    "roc_auc",
    "brier_score",
    "ece",
)
# Opt-in: roc_auc (rank-based, so it keeps every score: memory grows with N), and the
# calibration metrics brier_score and ece (expected calibration error, top-label).
DEFAULT_CLASSIFICATION_METRICS = CLASSIFICATION_METRICS[:7]
REGRESSION_METRICS = ("mse", "mae", "rmse", "r2_score", "explained_variance")
GENERATION_METRICS = ("perplexity", "token_accuracy")
# multi-label: accuracy is the exact-match (subset) accuracy, as scikit-learn's accuracy_score;
# roc_auc and average_precision are opt-in (rank-based: they keep every score)
MULTILABEL_METRICS = (
    "accuracy",
    "hamming_loss",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "average_precision",
)
DEFAULT_MULTILABEL_METRICS = MULTILABEL_METRICS[:5]
AVERAGES = ("weighted", "macro", "micro")
DISTRIBUTED_BACKENDS = ("auto", "nccl", "gloo")
# torch.compile modes without CUDA graphs: a CUDA graph's replay overwrites its outputs, and
# the loop keeps each step's loss tensor until the next log step (no per-step sync).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# The fields that say how a run is shown, logged and written, and where it runs: a
# continuation of a set of runs (a resumed cross-validation, a study's later trials) may
# change them; every other field shapes the results, and changing it would mix configs.
RUN_ONLY_FIELDS = (
    "progress_bar", "verbose", "device", "cpu_threads", "output_dir", "overwrite_output_dir",
    "tensorboard_logging", "wandb_logging", "wandb_project", "mlflow_logging",
    "mlflow_tracking_uri", "async_checkpointing", "checkpoint_writer",
    "distributed_timeout_seconds", "log_frequency",
)  # fmt: skip
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_WRITERS = ("auto", "process", "thread")
CHECKPOINT_SHARDING = ("auto", "full", "sharded")


# -- field checks: each raises ValueError naming field, value and what is allowed --------------

_fail = fail
_int = integer
_float = number
_bool = boolean
_choice = choice
_subset = subset


def setting(default: Any, rule: Rule) -> Any:
    """A config field with its rule beside it; a callable default (dict) is a factory."""
    if callable(default) and not isinstance(default, Rule):
        return dataclasses.field(default_factory=default, metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


def check_fields(config: Any, prefix: str = "") -> None:
    """Check every field by its rule, in declaration order; keep the normalised values.
    Errors name a field as `prefix` + its name (a mode's: `federated.clients`)."""
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        if rule is not None:
            value = getattr(config, f.name)
            normalised = rule(prefix + f.name, value)
            if normalised is not value:
                object.__setattr__(config, f.name, normalised)


def _path(field: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        _fail(field, value, "expected a path string or null")
    if isinstance(value, str) and "://" not in value:  # (a tracking URI is no file's name)
        longest = max((len(part.encode()) for part in Path(value).parts), default=0)
        if longest > 255 or len(value.encode()) > 4095:
            _fail(field, value, "a file system allows names of 255 bytes and paths of 4095")
    if isinstance(value, str) and value.startswith("~"):  # a shell expands it; YAML does not
        return str(Path(value).expanduser())
    return value


def _non_empty(field: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        _fail(field, value, "expected a non-empty project name")
    return value


def current_metric_name(name: Any) -> Any:
    """A metric's name as written today: `val/accuracy` (before one naming scheme) is
    `val_accuracy`, `train/epoch_loss` is `train_loss`; anything else as it is."""
    if not isinstance(name, str):
        return name
    if name in ("train/epoch_loss", "train/loss"):
        return "train_loss"
    found = re.fullmatch(r"(val|train|test)/(\w+)", name)
    return f"{found[1]}_{found[2]}" if found else name


def _monitor(field: str, value: Any) -> Any:
    value = current_metric_name(value)  # a run directory of an earlier version
    if not isinstance(value, str) or not re.fullmatch(r"(val|train)_\w+", value):
        _fail(
            field,
            value,
            "expected 'val_<metric>' or 'train_loss', e.g. 'val_loss' or 'val_accuracy'",
        )
    if value.startswith("train_") and value != "train_loss":
        _fail(field, value, "the only train metric is 'train_loss'")
    return value


def _device(field: str, value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
        return f"cuda:{int(value[5:])}"  # cuda:01 -> cuda:1
    if value not in DEVICES:
        hint = ["cuda"] if value == "gpu" else difflib.get_close_matches(str(value), DEVICES, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        allowed = "'auto', 'cpu', 'cuda', 'cuda:<index>' (one GPU, e.g. 'cuda:1'), 'mps'"
        _fail(field, value, f"expected one of {allowed}{suggestion}")
    return value


def _cpu_threads(field: str, value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "expected an integer >= 1, 'auto', or null (torch's setting)")
    return value


def _compile_mode(field: str, value: Any) -> Any:
    if value in ("reduce-overhead", "max-autotune"):
        _fail(
            field,
            value,
            "modes with CUDA graphs are not supported (a graph's replay overwrites the "
            "per-step losses the loop keeps until its next log step); use 'default' or "
            "'max-autotune-no-cudagraphs'",
        )
    _choice(field, value, COMPILE_MODES)
    return value


def _names(what: str, example: str) -> Any:
    def check(field: str, value: Any) -> Any:
        if isinstance(value, str) or not all(isinstance(name, str) and name for name in value):
            _fail(field, value, f"expected a list of {what}, e.g. [{example!r}]")
        return tuple(value)

    return check


def _stop_when(field: str, value: Any) -> tuple[str, ...]:
    """One condition or a list of them (any one met stops), each parsed here, before the run."""
    given = (value,) if isinstance(value, str) else value
    if not isinstance(given, (list, tuple)):
        _fail(field, value, f"expected {CONDITION_TEXT}, or a list of them")
    for i, text in enumerate(given):
        parse_condition(text, field if isinstance(value, str) else f"{field}[{i}]")
    return tuple(given)


def _max_time(field: str, value: Any) -> Any:
    if value is not None:
        parse_duration(value, field)
    return value


def _class_weights(field: str, value: Any) -> Any:
    if value is None or value == "balanced":
        return value
    if (
        isinstance(value, str)
        or not isinstance(value, Iterable)
        or not value
        or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in value
        )
        or not any(w > 0 for w in value)
    ):
        _fail(
            field,
            value,
            "expected 'balanced', a list of non-negative weights (one per class, at least one "
            "above 0), or null",
        )
    return tuple(float(w) for w in value)


def _lr_multipliers(field: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        _fail(field, value, "expected a mapping {prefix: factor}")
    for prefix, factor in value.items():
        if not isinstance(prefix, str) or not prefix:
            _fail(field, value, "keys must be parameter-name prefixes")
        _float(f"{field}[{prefix!r}]", factor, minimum=0.0, strict=True)
    return {k: float(v) for k, v in value.items()}


def _mode_settings(field: str, value: Any) -> Any:
    """Each mode's settings, by the rules beside them (`traineval.modes`)."""
    if not isinstance(value, Mapping):
        _fail(field, value, "expected {mode name: {setting: value}}")
    checked: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        mode = registry.lookup(name, field=f"{field} key")
        if not isinstance(settings, Mapping):
            _fail(f"{field}.{name}", settings, "expected {setting: value}")
        full = mode.from_settings(settings).settings()  # normalised; a choice it consumed
        checked[name] = {key: full.get(key, given) for key, given in settings.items()}
    return checked


C = TypeVar("C", bound="_ConfigBase")


class _ConfigBase:
    """Dict / YAML round trips shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain Python values (safe to YAML-dump or checkpoint)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a mapping; unknown keys are an error naming the allowed ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__} expects a mapping of fields, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(
                    f"{cls.__name__} has no field {key!r}{suggestion}; "
                    f"allowed fields: {', '.join(names)}"
                )
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: Sequence[str] = ()) -> C:
        """Load a config from a YAML file, then apply dotted `key=value` overrides."""
        return cls.from_dict(apply_overrides(load_yaml(path), overrides))

    def with_overrides(self: C, overrides: Sequence[str]) -> C:
        """Return a copy with `key=value` overrides applied (values parsed as YAML)."""
        return type(self).from_dict(apply_overrides(self.to_dict(), overrides))

    def save_yaml(self, path: str | Path) -> None:
        """Write the config as YAML (the run directory's record of what ran)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclasses.dataclass(frozen=True)
class TrainingConfig(_ConfigBase):
    """Configuration for training; every field is validated on construction.

    The first block is the specification's, with its defaults. `checkpoint_every_n_steps` (0: off)
    also saves `last` inside epochs, so a long epoch can be resumed in the middle;
    `async_checkpointing` writes the loop's checkpoints in the background (training pauses
    only to copy the state to host memory; one write at a time; the run ends once the last
    is on disk; see `traineval.runs.checkpoint_writer`; null, the default: for CPU runs on
    Linux whose model holds at least 48 MiB of weights and whose copy fits in a quarter of
    the free memory, unless checkpoints are sharded), by `checkpoint_writer`: "process" (a
    writer process over shared memory: serialisation and disk leave the training process;
    Linux, elsewhere a thread; `traineval.runs.checkpoint_process`), "thread", or "auto" (the
    process for CPU runs; the thread for GPU runs, which copies from the device through
    pinned memory; docs/checkpoints.md has the measurements; sharded checkpoints are
    written by a thread on every rank, `traineval.runs.shard_writer`);
    `skip_nonfinite_steps` (0: stop at the first) skips updates whose loss or gradient is not
    finite and stops after that many in a row (it reads the loss every step: a sync).
    `compile` runs the model and the loss function through `torch.compile` (separately, so
    a wrapped or sharded model compiles as it would alone; the loss's own graph fuses e.g.
    the fp32 log-softmax of bf16 logits); `compile_mode` is torch's mode, without CUDA graphs.
    `lr_multipliers` ({prefix: factor}) trains the parameters under a module path (e.g.
    "backbone") at `factor` times the learning rate (the longest matching prefix wins; the
    schedule keeps the ratios); `frozen_parameters` (prefixes) are not trained at all. Each
    prefix must name some parameter of the model (a tied weight by any of its names).
    An embedding with sparse gradients (`nn.Embedding(sparse=True)`) trains with
    optimizer_type "sgd" (Adam refuses sparse gradients): its weight takes no weight decay,
    and clipping measures its gradient by the values it holds.
    `label_smoothing` and `class_weights` (one per class, or "balanced") shape the default
    cross-entropy of supervised and federated classification (not a loss_function you pass).
    `ema_decay` (0: off; e.g. 0.999) keeps an exponential moving average of the weights,
    updated after every optimizer update (`ema_warmup`: a decay of min(decay, (1+t)/(10+t))
    at update t): evaluation, the best checkpoint, early stopping and the model after
    training use the averaged weights (see `traineval.training.averaging`); under FSDP each
    rank averages its own shards.

    Under `torchrun` the same config trains data-parallel: `batch_size` is per process,
    `distributed_strategy` is "ddp" or "fsdp" (torch's `fully_shard`: parameters, gradients
    and optimizer state sharded over the ranks, for models too large for one device; each
    submodule whose class is named in `fsdp_shard_modules`, by default each block of every
    `nn.ModuleList`, becomes its own shard unit), and `distributed_timeout_seconds` bounds
    every collective, so a rank that dies stops the others instead of leaving them hanging.
    Under FSDP each rank writes its own part of the model and optimizer into a folder beside
    each checkpoint file (`checkpoint_sharding`: "auto"), so no rank gathers the full state
    to save; the parts load on any number of ranks, and whole into one process for
    `evaluate` and `predict` (`traineval.runs.sharded`); `best.safetensors` is written from
    the folder a batch of tensors at a time (`traineval.runs.shard_export`).

    A training mode's own settings (federated clients, meta-learning's algorithm, ...) belong
    to the mode: `train(mode=Federated(clients=10))`, or `mode_settings` by mode name, or a
    config file's `mode:` section. The flat names of earlier versions (`federated_clients`,
    `rl_gamma`, `meta_algorithm`, `unlabeled_label`, ...) still load from config files and
    checkpoints (`from_dict`) into `mode_settings`, with a FutureWarning naming the new key
    (`LEGACY_MODE_KEYS`); `TrainingConfig(rl_gamma=...)` in Python is an error naming it.

    Precision: `precision` "auto" uses bf16 autocast on a CUDA device that supports it (else
    fp16 with a loss scaler) and fp32 on CPU and MPS; "bf16", "fp16" and "fp32" choose.
    `mixed_precision` is the specification's switch for the same thing: false means
    precision "fp32" (the config reads so after construction), and the saved `config.yaml`
    records only `precision`.

    Warmup: `warmup_ratio` > 0 warms up over that share of the run's optimizer updates
    (rounded up) instead of `warmup_steps` (then leave warmup_steps at 0 or its default:
    another warmup_steps beside it is refused). A warmup as long as the run or longer
    (e.g. the default 1000 steps on a small dataset) is shortened to a tenth of the run, so
    the defaults train any dataset: quietly for the default, with one warning naming both
    numbers for a warmup_steps you set (even to 1000; `given_fields` tells them apart).

    `monitor_mode` "auto" reads the direction from the metric's name (losses and errors
    lower, scores higher); "min" or "max" against a built-in metric's direction (e.g. "max"
    on val_loss) is refused. `device` is "auto", "cpu", "cuda", "cuda:<index>" (one GPU of
    several; not under torchrun, where each rank takes cuda:LOCAL_RANK) or "mps"; a GPU
    asked for on a machine without one falls back to the CPU with a warning.

    `batch_size` sizes the loaders traineval builds (config-file runs, cross-validation
    folds, the modes' own loaders); a DataLoader you pass to `train()` keeps its own batch
    size (it is yours), with a warning when it differs from `batch_size` (a val loader's,
    when it differs from an `eval_batch_size` you set). A resume compares
    the config's `batch_size` with the checkpoint's: keep it equal to your loader's so that
    the check covers your loader too.

    `cpu_threads` ("auto") trains a model under 500,000 parameters on one CPU thread: its
    operators are too small to share, and where other processes use the cores too, more
    threads mostly wait for each other (2.3-2.6x faster with one thread on a busy 2-core
    machine, 14% slower on an idle one); larger models keep torch's default. An
    `OMP_NUM_THREADS` you set wins; `null` leaves torch's setting alone.

    Steps are optimizer updates throughout: `warmup_steps`, `eval_frequency`,
    `log_frequency` and `max_steps` count updates, not micro-batches, so they mean the same
    thing whatever `gradient_accumulation_steps` is.

    Example:
        >>> TrainingConfig(num_epochs=5, learning_rate=1e-3).learning_rate
        0.001
        >>> TrainingConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        traineval.config.checks.SettingError: batch_size=0 is invalid: expected an integer >= 1
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> TrainingConfig:
        # A flat mode key of an earlier version, given in Python: say where it went (config
        # files and checkpoints translate it, see `from_dict`).
        for key in kwargs:
            if key in LEGACY_MODE_KEYS:
                mode, name = LEGACY_MODE_KEYS[key]
                raise TypeError(
                    f"TrainingConfig has no field {key!r}: it is now the {mode} mode's {name!r} "
                    f"setting; train(mode=...) with a {mode} mode that sets it, or "
                    f"mode_settings={{{mode!r}: {{{name!r}: ...}}}}"
                )
        config = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(config, "_given", frozenset((*names[: len(args)], *kwargs)))
        return config

    @property
    def given_fields(self) -> frozenset[str]:
        """The fields given a value when the config was made (keyword arguments, a config
        file's keys), as opposed to left at their defaults; `replace` and `with_overrides`
        keep them and add their own (`dataclasses.replace` gives every field)."""
        return getattr(self, "_given", frozenset())

    def given_dict(self) -> dict[str, Any]:
        """`to_dict` as a config file would hold it: the fields given, and those that
        differ from their defaults (a precision that mixed_precision=false folded); built
        again, it gives an equal config with the same `given_fields`."""
        defaults = _default_dict()
        return {
            key: value
            for key, value in self.to_dict().items()
            if key in self.given_fields or value != defaults[key]
        }

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with `changes` applied and checked, remembering which fields were given."""
        return _given_besides(dataclasses.replace(self, **changes), self, changes)

    def with_overrides(self, overrides: Sequence[str]) -> TrainingConfig:
        """As `_ConfigBase.with_overrides`, remembering which fields were given."""
        keys = [text.partition("=")[0].partition(".")[0].strip() for text in overrides]
        return _given_besides(super().with_overrides(overrides), self, keys)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """As `_ConfigBase.from_dict`; the flat mode keys of earlier versions (a config
        file's, a checkpoint's) are translated into `mode_settings`, each with a
        FutureWarning naming its new key."""
        if isinstance(data, Mapping) and any(key in LEGACY_MODE_KEYS for key in data):
            data = dict(data)
            moved = take_legacy_keys(data, LEGACY_MODE_KEYS, "", stacklevel=3)
            data["mode_settings"] = _merge_settings(data.get("mode_settings") or {}, moved)
        return super().from_dict(data)

    # Training parameters (the specification's, with its defaults: docs/design.md)
    num_epochs: int = setting(100, Int(1))
    batch_size: int = setting(32, Int(1))
    learning_rate: float = setting(1e-4, Number(0, strict=True))
    weight_decay: float = setting(1e-5, Number(0))
    gradient_clipping: bool = setting(True, Flag())
    max_grad_norm: float = setting(1.0, Number(0, strict=True))
    # Optimization
    optimizer_type: str = setting("adamw", OneOf(OPTIMIZERS))
    scheduler_type: str = setting("cosine", OneOf(SCHEDULERS))
    warmup_steps: int = setting(_DEFAULT_WARMUP_STEPS, Int(0))
    lr_scheduler_patience: int = setting(5, Int(0))
    # Advanced features
    mixed_precision: bool = setting(True, Flag())
    gradient_accumulation_steps: int = setting(1, Int(1))
    early_stopping_patience: int = setting(10, Int(0))
    checkpoint_save_frequency: int = setting(5, Int(0))
    # Monitoring
    log_frequency: int = setting(100, Int(1))
    eval_frequency: int = setting(500, Int(1))
    tensorboard_logging: bool = setting(True, Flag())
    wandb_logging: bool = setting(False, Flag())

    # Used by the specification but missing from its config
    save_best_model: bool = setting(True, Flag())
    eval_batch_size: int | None = setting(None, Int(1, optional=True))
    # What a real run needs
    seed: int = setting(42, Int(0, maximum=MAX_SEED))
    output_dir: str | None = setting(None, Custom(_path, "a path, or null"))
    overwrite_output_dir: bool = setting(False, Flag())
    device: str = setting("auto", Custom(_device, "one of auto, cpu, cuda, cuda:<index>, mps"))
    precision: str = setting("auto", OneOf(PRECISIONS))
    monitor_metric: str = setting("val_loss", Custom(_monitor, "val_<metric> or train_loss"))
    monitor_mode: str = setting("auto", OneOf(MONITOR_MODES))
    early_stopping_min_delta: float = setting(0.0, Number(0))
    restore_best_weights: bool = setting(False, Flag())
    save_last_checkpoint: bool = setting(True, Flag())
    compile: bool = setting(False, Flag())
    compile_mode: str = setting(
        "default", Custom(_compile_mode, "one of " + ", ".join(COMPILE_MODES))
    )
    max_steps: int | None = setting(None, Int(1, optional=True))
    deterministic: bool = setting(False, Flag())
    progress_bar: bool | None = setting(None, Flag(optional=True))
    # stop once a metric reaches a value, e.g. "val_accuracy >= 0.98" (a list: any one)
    stop_when: tuple[str, ...] = setting((), Custom(_stop_when, CONDITION_TEXT + ", or a list"))
    # stop after this much training in this process (a resume continues): 3600, "2h", "01:00:00"
    max_time: float | str | None = setting(None, Custom(_max_time, DURATION_TEXT + ", or null"))
    # a line per epoch (and, without the bar, one every 30 s inside an epoch) to stderr, or
    # to logging where it is set up; false: none
    verbose: bool = setting(True, Flag())
    checkpoint_every_n_steps: int = setting(0, Int(0))
    # null (auto): in the background where that was measured to win, a CPU run on Linux
    # (the writer process) whose model holds at least 48 MiB of weights (and whose copy
    # fits in a quarter of the free memory); true or false: as set
    async_checkpointing: bool | None = setting(None, Flag(optional=True))
    checkpoint_writer: str = setting("auto", OneOf(CHECKPOINT_WRITERS))
    skip_nonfinite_steps: int = setting(0, Int(0))
    log_layer_grad_norms: bool = setting(False, Flag())
    ema_decay: float = setting(0.0, Number(0, below=1))
    ema_warmup: bool = setting(False, Flag())
    # The warmup as a share of the run's optimizer updates (the Hugging Face Trainer's):
    # when > 0 it replaces warmup_steps
    warmup_ratio: float = setting(0.0, Number(0, below=1))
    # The default classification loss: cross-entropy with label smoothing and class weights
    # ("balanced": n / (classes x count), from the training labels, and 1.0 for a class they
    # never show; or one weight per class)
    label_smoothing: float = setting(0.0, Number(0, below=1))
    class_weights: str | tuple[float, ...] | None = setting(
        None, Custom(_class_weights, "balanced, a list of weights >= 0 (one per class), or null")
    )
    # Fine-tuning: parameter-name prefixes (module paths, e.g. "backbone" or "encoder.layer0")
    lr_multipliers: dict[str, float] = setting(
        dict, Custom(_lr_multipliers, "{parameter-name prefix: factor > 0}")
    )
    frozen_parameters: tuple[str, ...] = setting(
        (),
        Custom(_names("parameter-name prefixes", "backbone"), "a list of parameter-name prefixes"),
    )
    wandb_project: str = setting("traineval", Custom(_non_empty, "a non-empty project name"))
    mlflow_logging: bool = setting(False, Flag())
    mlflow_tracking_uri: str | None = setting(None, Custom(_path, "a tracking URI, or null"))
    # Settings of the training modes by name, used when that mode trains, e.g.
    # {federated: {clients: 10}} (config files: the `mode:` section; Python: also
    # train(mode=Federated(clients=10))). See traineval.modes.
    mode_settings: dict[str, dict[str, Any]] = setting(
        dict, Custom(_mode_settings, "{mode name: {setting: value}}")
    )
    # Distributed training under torchrun (ignored in a single process)
    distributed_strategy: str = setting("ddp", OneOf(DISTRIBUTED_STRATEGIES))
    distributed_backend: str = setting("auto", OneOf(DISTRIBUTED_BACKENDS))
    distributed_timeout_seconds: float = setting(600.0, Number(0, strict=True))
    find_unused_parameters: bool = setting(False, Flag())
    fsdp_shard_modules: tuple[str, ...] = setting(
        (), Custom(_names("module class names", "Block"), "a list of module class names")
    )
    # "auto": where FSDP shards the model, each rank writes its part of the model and the
    # optimizer (a folder beside each checkpoint file; loads on any number of ranks);
    # "full": one file, the full state gathered on rank 0; "sharded": always in parts
    checkpoint_sharding: str = setting("auto", OneOf(CHECKPOINT_SHARDING))
    # Optimizer and scheduler details
    momentum: float = setting(0.9, Number(0, below=1))
    adam_beta1: float = setting(0.9, Number(0, below=1))
    adam_beta2: float = setting(0.999, Number(0, below=1))
    adam_epsilon: float = setting(1e-8, Number(0, strict=True))
    min_learning_rate: float = setting(0.0, Number(0))
    scheduler_step_size: int = setting(1000, Int(1))
    scheduler_gamma: float = setting(0.1, Number(0, below=1))
    lr_scheduler_factor: float = setting(0.5, Number(0, below=1))
    # torch's CPU threads while the run trains and evaluates on the CPU: a count, "auto"
    # (one thread for a model under 500,000 parameters, whose operators are too small to
    # share, unless OMP_NUM_THREADS is set; torch's default for larger ones), or null
    # (leave torch's setting, e.g. your own torch.set_num_threads)
    cpu_threads: int | str | None = setting(
        "auto", Custom(_cpu_threads, "an integer >= 1, 'auto', or null")
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_relations()
        self._fold_precision()

    def _fold_precision(self) -> None:
        """`mixed_precision` is the specification's shorthand for "precision is not fp32":
        false folds into precision="fp32", and precision="fp32" reads as mixed_precision
        false, so the two never disagree and a saved config needs only `precision`."""
        if not self.mixed_precision:
            object.__setattr__(self, "precision", "fp32")
        elif self.precision == "fp32":
            object.__setattr__(self, "mixed_precision", False)

    def to_dict(self) -> dict[str, Any]:
        """As `_ConfigBase.to_dict`, without `mixed_precision`: `precision` says it (see
        `_fold_precision`), and loading the dict gives back an equal config."""
        out = super().to_dict()
        del out["mixed_precision"]
        return out

    def _check_relations(self) -> None:
        """The rules that relate two fields (each field's own rule stands beside it)."""
        if not self.mixed_precision and self.precision in ("bf16", "fp16"):
            _fail(
                "precision",
                self.precision,
                "mixed_precision=false allows only 'auto' or 'fp32'; set mixed_precision=true",
            )
        if self.warmup_ratio > 0 and self.warmup_steps not in (0, _DEFAULT_WARMUP_STEPS):
            _fail(  # 0 (no warmup by steps) and the default leave the warmup to the ratio
                "warmup_steps",
                self.warmup_steps,
                f"warmup_ratio={self.warmup_ratio} sets the warmup too; set one of them "
                "(warmup_steps 0 leaves it to the ratio)",
            )
        self._check_monitor_direction()
        if self.min_learning_rate >= self.learning_rate:
            _fail(
                "min_learning_rate",
                self.min_learning_rate,
                f"expected a value below learning_rate={self.learning_rate}",
            )

    def _check_monitor_direction(self) -> None:
        """An explicit monitor_mode against a built-in metric's known direction (the
        loss's, accuracy's, ...) is a mistake that would keep the worst checkpoint."""
        lower = known_direction(self.monitor_metric)
        if self.monitor_mode != "auto" and lower not in (None, self.monitor_mode == "min"):
            better, mode = ("lower", "min") if lower else ("higher", "max")
            _fail(
                "monitor_mode",
                self.monitor_mode,
                f"{self.monitor_metric} is better when {better}: set {mode!r}, or 'auto'",
            )

    @property
    def minimize_monitor(self) -> bool:
        """Whether a lower value of `monitor_metric` is better (resolves `monitor_mode=auto`)."""
        if self.monitor_mode != "auto":
            return self.monitor_mode == "min"
        return metric_is_minimized(self.monitor_metric)

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


@functools.cache
def _default_dict() -> dict[str, Any]:
    return TrainingConfig().to_dict()


def _given_besides(config: TrainingConfig, source: TrainingConfig, more: Iterable[str]) -> Any:
    """`config` (a copy of `source`) remembering `source`'s given fields and `more`."""
    object.__setattr__(config, "_given", source.given_fields | set(more))
    return config


def known_direction(metric: str) -> bool | None:
    """Whether lower is better for `metric` (`val_<name>`, `train_loss`) when it is a
    built-in metric or the loss, whose directions are known; None for any other name."""
    name = metric.partition("_")[2]
    built_in = {name for names in BUILT_IN_METRICS.values() for name in names}
    if name not in (built_in - {"confusion_matrix"}) | {"loss"}:
        return None
    return metric_is_minimized(name)


# The flat names of earlier versions -> (mode, setting). They still load, into
# `mode_settings`, with a FutureWarning naming the new key.
LEGACY_MODE_KEYS: dict[str, tuple[str, str]] = {
    "unlabeled_label": ("semi_supervised", "unlabeled_label"),
    "unlabeled_weight": ("semi_supervised", "unlabeled_weight"),
    "pseudo_label_threshold": ("semi_supervised", "pseudo_label_threshold"),
    "rl_episodes_per_update": ("reinforcement", "episodes_per_update"),
    "rl_updates_per_epoch": ("reinforcement", "updates_per_epoch"),
    "rl_gamma": ("reinforcement", "gamma"),
    "rl_value_coef": ("reinforcement", "value_coef"),
    "rl_entropy_coef": ("reinforcement", "entropy_coef"),
    "rl_normalize_advantages": ("reinforcement", "normalize_advantages"),
    "rl_max_episode_steps": ("reinforcement", "max_episode_steps"),
    "rl_eval_episodes": ("reinforcement", "eval_episodes"),
    "meta_algorithm": ("meta_learning", "algorithm"),
    "meta_inner_lr": ("meta_learning", "inner_lr"),
    "meta_inner_steps": ("meta_learning", "inner_steps"),
    "federated_clients": ("federated", "clients"),
    "federated_partition": ("federated", "partition"),
    "federated_dirichlet_alpha": ("federated", "dirichlet_alpha"),
    "federated_local_epochs": ("federated", "local_epochs"),
    "federated_client_fraction": ("federated", "client_fraction"),
    "federated_server_lr": ("federated", "server_lr"),
    "federated_server_momentum": ("federated", "server_momentum"),
}


def take_legacy_keys(
    values: dict[str, Any], table: Mapping[str, tuple[str, str]], section: str, stacklevel: int
) -> dict[str, dict[str, Any]]:
    """Move the legacy keys of `table` out of `values` into `{mode: {setting: value}}`,
    checking each by its mode's rule (an error names the key as written) and warning once
    per key with the new one."""
    moved: dict[str, dict[str, Any]] = {}
    for key in [k for k in values if k in table]:
        mode, setting = table[key]
        value = values.pop(key)
        try:
            registry.lookup(mode).from_settings({setting: value})
        except SettingError as error:
            raise SettingError(f"{section}{key}", value, error.allowed) from None
        warnings.warn(
            f"{section}{key} is deprecated: it is now the {mode} mode's {setting!r} setting "
            f"(config file: `mode: {{name: {mode}, {setting}: ...}}`; Python: "
            f"`train(mode=...)` with a {mode} mode, or mode_settings={{{mode!r}: "
            f"{{{setting!r}: ...}}}})",
            FutureWarning,
            stacklevel=stacklevel,
        )
        moved.setdefault(mode, {})[setting] = value
    return moved


def _merge_settings(
    given: Mapping[str, Mapping[str, Any]], moved: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    out = {name: dict(settings) for name, settings in given.items()}
    for name, settings in moved.items():
        for setting, value in settings.items():
            if setting in out.get(name, {}) and out[name][setting] != value:
                _fail(
                    f"mode_settings.{name}.{setting}",
                    out[name][setting],
                    f"also given by its deprecated flat key as {value!r}; keep one",
                )
            out.setdefault(name, {})[setting] = value
    return out


# The built-in metrics' directions (True: lower is better), read before any name rule.
BUILT_IN_LOWER = {"loss", "log_loss", "brier_score", "ece", "mse", "mae", "rmse"}
BUILT_IN_LOWER |= {"hamming_loss", "perplexity", "confusion_matrix"}
# A metric's direction read from its name (its val_/train_/test_ prefix aside): these words
# say lower is better, and win over those that say higher is (scikit-learn's
# brier_score_loss); a name starting as scikit-learn's negated losses (neg_log_loss) and D²
# scores (d2_log_loss_score) do is better higher. Checked against every scikit-learn
# scorer's direction. `loss`, `error` and the first words that say higher are matched
# anywhere in the name (val_top1accuracy); the others only as whole words between
# underscores (not val_wrong_indices' "dice").
_MINIMIZED_ANYWHERE = ("loss", "error")
_MINIMIZED: tuple[str, ...] = ("deviance", "perplexity", "davies_bouldin", "mse", "mae")
_MINIMIZED += ("rmse", "mape", "ece")
_MAXIMIZED: tuple[str, ...] = ("return", "reward", "accuracy", "precision", "recall", "f1")
_MAXIMIZED += ("r2", "auc")
_MAXIMIZED += ("explained_variance", "bleu", "rouge")
_MAXIMIZED_WORDS = ("score", "corrcoef", "kappa", "jaccard", "dice", "iou", "ndcg", "dcg")
_HIGHER_PREFIXES = ("neg_", "d2_", "positive_likelihood")
_SPLITS = ("val_", "train_", "test_", "cv_", "ensemble_")


def named_direction(name: str) -> bool | None:
    """Whether `name` says lower is better (True), higher (False), or neither (None)."""
    base = name.lower()
    for split in _SPLITS:
        base = base.removeprefix(split)
    if base in BUILT_IN_LOWER:
        return True
    if base.startswith(_HIGHER_PREFIXES):
        return False
    words = f"_{base}_"
    if any(token in base for token in _MINIMIZED_ANYWHERE):
        return True
    if any(f"_{token}_" in words for token in _MINIMIZED):
        return True
    if any(token in base for token in _MAXIMIZED):
        return False
    return False if any(f"_{token}_" in words for token in _MAXIMIZED_WORDS) else None


def metric_is_minimized(name: str) -> bool:
    """Guess a metric's direction from its name: losses and errors down, scores up; a name
    that says neither (mse, ece) down."""
    said = named_direction(name)
    return True if said is None else said


MAX_CALIBRATION_BINS = 10_000
MAX_RESAMPLES = 100_000


@dataclasses.dataclass(frozen=True)
class EvaluationConfig(_ConfigBase):
    """Configuration for evaluation (the specification's `EvaluationConfig`).

    Each task's metric list takes the built-in names, names registered with
    `traineval.evaluation.register_metric`, and import paths `package.module:name` of your
    own metrics (a function `fn(y_true, y_pred)`, a torchmetrics `Metric` or a streaming
    metric, or a function of no arguments that builds one), reported as `val_<name>`.
    `top_k_accuracy` is reported where the model scores more than `top_k` classes (with
    `top_k` or fewer every label is in the top k, and the metric is left out).
    """

    compute_metrics: bool = True
    save_predictions: bool = False
    plot_metrics: bool = False
    classification_metrics: tuple[str, ...] = DEFAULT_CLASSIFICATION_METRICS
    regression_metrics: tuple[str, ...] = ("mse", "mae", "rmse", "r2_score")
    generation_metrics: tuple[str, ...] = GENERATION_METRICS
    multilabel_metrics: tuple[str, ...] = DEFAULT_MULTILABEL_METRICS
    average: str = "weighted"
    multilabel_threshold: float = 0.5
    top_k: int = 5
    calibration_bins: int = 15  # at most 10,000
    # Bootstrap confidence intervals of the classification / regression metrics (0: off; at
    # most 100,000): resamples of the evaluated samples, kept on the host while evaluating.
    bootstrap_samples: int = 0
    confidence_level: float = 0.95
    bootstrap_seed: int = 0
    ignore_index: int = -100
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("compute_metrics", "save_predictions", "plot_metrics"):
            _bool(name, getattr(self, name))
        for field, built_in in BUILT_IN_METRICS.items():
            _metric_list(field, getattr(self, field), built_in)
        for name in (
            "classification_metrics",
            "regression_metrics",
            "generation_metrics",
            "multilabel_metrics",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _choice("average", self.average, AVERAGES)
        _float("multilabel_threshold", self.multilabel_threshold, minimum=0.0, strict=True)
        if self.multilabel_threshold >= 1.0:
            _fail(
                "multilabel_threshold",
                self.multilabel_threshold,
                "expected a probability in (0, 1): a label is predicted when its sigmoid "
                "probability exceeds it",
            )
        _int("top_k", self.top_k, minimum=1)
        # bounded: each bin is counted per batch, and each resample scores every sample (a
        # value in the billions would run out of memory or time after training)
        _int("calibration_bins", self.calibration_bins, minimum=1, maximum=MAX_CALIBRATION_BINS)
        _int("bootstrap_samples", self.bootstrap_samples, minimum=0, maximum=MAX_RESAMPLES)
        _int("bootstrap_seed", self.bootstrap_seed, minimum=0, maximum=MAX_SEED)
        _float("confidence_level", self.confidence_level, minimum=0.0, strict=True)
        if self.confidence_level >= 1.0:
            _fail("confidence_level", self.confidence_level, "expected a number in (0, 1)")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            _fail("ignore_index", self.ignore_index, "expected an integer")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            _fail("output_dir", self.output_dir, "expected a path string or null")


BUILT_IN_METRICS = {
    "classification_metrics": CLASSIFICATION_METRICS,
    "regression_metrics": REGRESSION_METRICS,
    "generation_metrics": GENERATION_METRICS,
    "multilabel_metrics": MULTILABEL_METRICS,
}


def _metric_list(field: str, values: Any, built_in: Sequence[str]) -> None:
    """A task's metric list: built-in names, names registered with `register_metric`, and
    import paths `package.module:name` of the user's metrics (resolved by the evaluator)."""
    allowed = f"{', '.join(map(repr, built_in))}, a registered metric, or an import path"
    if isinstance(values, str) or not isinstance(values, Iterable):
        _fail(field, values, f"expected a list drawn from {allowed}")
    for index, value in enumerate(values):
        known = value in built_in or value in registry.metrics()
        if not known and not (isinstance(value, str) and IMPORT_PATH.match(value)):
            hint = difflib.get_close_matches(str(value), built_in, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            _fail(
                f"{field}[{index}]", value, f"expected one of {allowed} 'package.module:name'{also}"
            )


# -- YAML and dotted overrides -------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """Parse one override value the way a YAML file would (`1e-3`, `true`, `[a, b]`, `null`)."""
    try:
        return untrusted_text.load(text)
    except untrusted_text.TooLarge as error:
        raise ValueError(f"override value {_shown(text)} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(
            f"override value {_shown(text)} is not valid YAML: {_yaml_problem(error)}"
        ) from None


def _shown(text: str) -> str:
    """`text` quoted for an error line, cut to 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = (getattr(error, "problem", None) or str(error).splitlines()[0]) + where
    if "python/" in str(error):
        problem += "; Python tags (!!python/...) are refused: a config holds plain values"
    return problem


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a clear error."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory: name a YAML file in it")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        text = untrusted_text.read_utf8(path, "config file")
        if cut_run_config(text):
            raise ValueError(
                f"config file {str(path)!r} is incomplete: a run's config.yaml ends with the "
                f"line {RUN_CONFIG_END!r}, and this one stops before it (cut short in a copy "
                "or a download); copy it again from the run's folder"
            )
        data = untrusted_text.load(text)
    except untrusted_text.TooLarge as error:
        raise ValueError(f"config file {str(path)!r} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted `a.b.c=value` overrides applied.

    >>> apply_overrides({"training": {"batch_size": 8}}, ["training.batch_size=16"])
    {'training': {'batch_size': 16}}
    """
    out = _deep_copy(data)
    overridden = {o.partition("=")[0].strip().split(".")[-1] for o in overrides}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"override {item!r} is invalid: expected key=value, e.g. training.seed=1"
            )
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a section whose keys are commented out
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r} is invalid: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
        follower = FOLLOWS.get(parts[-1])
        if follower is not None and follower not in overridden:
            node.pop(follower, None)  # it follows the overridden setting again
    return out


# A setting whose value a file may hold only as a consequence of another: overriding the
# other lets it follow again (`mixed_precision=true` on a config that says precision fp32
# because mixed precision was off turns mixed precision back on: precision "auto").
FOLLOWS = {"mixed_precision": "precision"}


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
