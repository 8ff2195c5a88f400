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
from typing import Any, ClassVar, TypeVar

import yaml

from . import registry
from .checks import (
    SettingError,
    boolean,
    choice,
    fail,
    integer,
    number,
    optional_integer,
    subset,
)

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
SCHEDULERS = ("cosine", "step", "plateau", "onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MONITOR_MODES = ("auto", "min", "max")
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
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")


# -- field checks: each raises ValueError naming field, value and what is allowed --------------

_fail = fail
_int = integer
_optional_int = optional_integer
_float = number
_bool = boolean
_choice = choice
_subset = subset


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
            if key not in names and key not in getattr(cls, "legacy_keys", ()):
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
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclasses.dataclass(frozen=True)
class TrainingConfig(_ConfigBase):
    """Configuration for training; every field is validated on construction.

    The first block is the specification's, with its defaults. `checkpoint_every_n_steps` (0: off)
    also saves `last` inside epochs, so a long epoch can be resumed in the middle;
    `skip_nonfinite_steps` (0: stop at the first) skips updates whose loss or gradient is not
    finite and stops after that many in a row (it reads the loss every step: a sync).
    `compile` runs the model and the loss function through `torch.compile` (separately, so
    a wrapped or sharded model compiles as it would alone; the loss's own graph fuses e.g.
    the fp32 log-softmax of bf16 logits); `compile_mode` is torch's mode, without CUDA graphs.
    `lr_multipliers` ({prefix: factor}) trains the parameters under a module path (e.g.
    "backbone") at `factor` times the learning rate (the longest matching prefix wins; the
    schedule keeps the ratios); `frozen_parameters` (prefixes) are not trained at all. Each
    prefix must name some parameter of the model.
    `label_smoothing` and `class_weights` (one per class, or "balanced") shape the default
    cross-entropy of supervised and federated classification (not a loss_function you pass).
    `ema_decay` (0: off; e.g. 0.999) keeps an exponential moving average of the weights,
    updated after every optimizer update (`ema_warmup`: a decay of min(decay, (1+t)/(10+t))
    at update t): evaluation, the best checkpoint, early stopping and the model after
    training use the averaged weights (see `traineval.averaging`).

    Under `torchrun` the same config trains data-parallel: `batch_size` is per process,
    `distributed_strategy` is "ddp" or "fsdp" (torch's `fully_shard`: parameters, gradients
    and optimizer state sharded over the ranks, for models too large for one device; each
    submodule whose class is named in `fsdp_shard_modules`, by default each block of every
    `nn.ModuleList`, becomes its own shard unit), and `distributed_timeout_seconds` bounds
    every collective, so a rank that dies stops the others instead of leaving them hanging.

    A training mode's own settings (federated clients, meta-learning's algorithm, ...) belong
    to the mode: `train(mode=Federated(clients=10))`, or `mode_settings` by mode name, or a
    config file's `mode:` section. The flat names of earlier versions (`federated_clients`,
    `rl_gamma`, `meta_algorithm`, `unlabeled_label`, ...) still load into `mode_settings`, with
    a FutureWarning naming the new key (`LEGACY_MODE_KEYS`).

    Warmup: `warmup_ratio` > 0 warms up over that share of the run's optimizer updates
    (rounded up) instead of `warmup_steps`. A warmup as long as the run or longer (e.g. the
    default 1000 steps on a small dataset) is shortened to a tenth of the run, with one
    warning naming both numbers, so the defaults train any dataset.

    Steps are optimizer updates throughout: `warmup_steps`, `eval_frequency`,
    `log_frequency` and `max_steps` count updates, not micro-batches, so they mean the same
    thing whatever `gradient_accumulation_steps` is.

    Example:
        >>> TrainingConfig(num_epochs=5, learning_rate=1e-3).learning_rate
        0.001
        >>> TrainingConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        traineval.checks.SettingError: batch_size=0 is invalid: expected an integer >= 1
    """

    legacy_keys: ClassVar[tuple[str, ...]] = ()  # flat names of earlier versions, still loaded

    # Training parameters (the specification's, with its defaults: docs/design.md)
    num_epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    gradient_clipping: bool = True
    max_grad_norm: float = 1.0
    # Optimization
    optimizer_type: str = "adamw"
    scheduler_type: str = "cosine"
    warmup_steps: int = 1000
    lr_scheduler_patience: int = 5
    # Advanced features
    mixed_precision: bool = True
    gradient_accumulation_steps: int = 1
    early_stopping_patience: int = 10
    checkpoint_save_frequency: int = 5
    # Monitoring
    log_frequency: int = 100
    eval_frequency: int = 500
    tensorboard_logging: bool = True
    wandb_logging: bool = False

    # Used by the specification but missing from its config
    save_best_model: bool = True
    eval_batch_size: int | None = None
    # What a real run needs
    seed: int = 42
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    device: str = "auto"
    precision: str = "auto"
    monitor_metric: str = "val_loss"
    monitor_mode: str = "auto"
    early_stopping_min_delta: float = 0.0
    restore_best_weights: bool = False
    save_last_checkpoint: bool = True
    compile: bool = False
    compile_mode: str = "default"
    max_steps: int | None = None
    deterministic: bool = False
    progress_bar: bool | None = None
    checkpoint_every_n_steps: int = 0
    skip_nonfinite_steps: int = 0
    log_layer_grad_norms: bool = False
    ema_decay: float = 0.0
    ema_warmup: bool = False
    # The warmup as a share of the run's optimizer updates (the Hugging Face Trainer's):
    # when > 0 it replaces warmup_steps
    warmup_ratio: float = 0.0
    # The default classification loss: cross-entropy with label smoothing and class weights
    # ("balanced": n / (classes x count), from the training labels; or one weight per class)
    label_smoothing: float = 0.0
    class_weights: str | tuple[float, ...] | None = None
    # Fine-tuning: parameter-name prefixes (module paths, e.g. "backbone" or "encoder.layer0")
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)
    frozen_parameters: tuple[str, ...] = ()
    wandb_project: str = "traineval"
    mlflow_logging: bool = False
    mlflow_tracking_uri: str | None = None
    # Settings of the training modes by name, used when that mode trains, e.g.
    # {federated: {clients: 10}} (config files: the `mode:` section; Python: also
    # train(mode=Federated(clients=10))). See traineval.modes.
    mode_settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Distributed training under torchrun (ignored in a single process)
    distributed_strategy: str = "ddp"
    distributed_backend: str = "auto"
    distributed_timeout_seconds: float = 600.0
    find_unused_parameters: bool = False
    fsdp_shard_modules: tuple[str, ...] = ()
    # Optimizer and scheduler details
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    min_learning_rate: float = 0.0
    scheduler_step_size: int = 1000
    scheduler_gamma: float = 0.1
    lr_scheduler_factor: float = 0.5

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self._check_fine_tuning()
        self._check_mode_settings()
        self._check_run()

    def _check_numbers(self) -> None:
        """Integers, numbers and fractions in range; switches that are booleans."""
        for name in (
            "num_epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "log_frequency",
            "eval_frequency",
            "scheduler_step_size",
        ):
            _int(name, getattr(self, name), minimum=1)
        for name in (
            "warmup_steps",
            "lr_scheduler_patience",
            "early_stopping_patience",
            "checkpoint_save_frequency",
            "checkpoint_every_n_steps",
            "skip_nonfinite_steps",
            "seed",
        ):
            _int(name, getattr(self, name), minimum=0)
        _optional_int("eval_batch_size", self.eval_batch_size, minimum=1)
        _optional_int("max_steps", self.max_steps, minimum=1)
        _float("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        _float("max_grad_norm", self.max_grad_norm, minimum=0.0, strict=True)
        for name in ("weight_decay", "early_stopping_min_delta", "min_learning_rate"):
            _float(name, getattr(self, name), minimum=0.0)
        for name in (
            "momentum",
            "adam_beta1",
            "adam_beta2",
            "scheduler_gamma",
            "lr_scheduler_factor",
            "ema_decay",
        ):
            _float(name, getattr(self, name), minimum=0.0)
            if getattr(self, name) >= 1.0:
                _fail(name, getattr(self, name), "expected a number in [0, 1)")
        _float("adam_epsilon", self.adam_epsilon, minimum=0.0, strict=True)
        for name in (
            "gradient_clipping",
            "mixed_precision",
            "tensorboard_logging",
            "wandb_logging",
            "save_best_model",
            "overwrite_output_dir",
            "restore_best_weights",
            "save_last_checkpoint",
            "compile",
            "deterministic",
            "log_layer_grad_norms",
            "mlflow_logging",
            "find_unused_parameters",
            "ema_warmup",
        ):
            _bool(name, getattr(self, name))

    def _check_choices(self) -> None:
        """Names from a fixed list (with a did-you-mean), and combinations they rule out."""
        if self.ema_decay and self.distributed_strategy == "fsdp":
            _fail(
                "ema_decay",
                self.ema_decay,
                "a moving average of sharded weights is not supported yet: use "
                "distributed_strategy='ddp' or ema_decay=0",
            )
        if self.progress_bar is not None:
            _bool("progress_bar", self.progress_bar)
        _choice("optimizer_type", self.optimizer_type, OPTIMIZERS)
        _choice("scheduler_type", self.scheduler_type, SCHEDULERS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("monitor_mode", self.monitor_mode, MONITOR_MODES)
        _choice("distributed_strategy", self.distributed_strategy, DISTRIBUTED_STRATEGIES)
        _choice("distributed_backend", self.distributed_backend, DISTRIBUTED_BACKENDS)
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            _fail(
                "compile_mode",
                self.compile_mode,
                "modes with CUDA graphs are not supported (a graph's replay overwrites the "
                "per-step losses the loop keeps until its next log step); use 'default' or "
                "'max-autotune-no-cudagraphs'",
            )
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if isinstance(self.fsdp_shard_modules, str) or not all(
            isinstance(name, str) and name for name in self.fsdp_shard_modules
        ):
            _fail(
                "fsdp_shard_modules",
                self.fsdp_shard_modules,
                "expected a list of module class names, e.g. ['Block']",
            )
        object.__setattr__(self, "fsdp_shard_modules", tuple(self.fsdp_shard_modules))

    def _check_fine_tuning(self) -> None:
        """Loss shaping and fine-tuning settings (lists and mappings normalised)."""
        _float("warmup_ratio", self.warmup_ratio, minimum=0.0)
        if self.warmup_ratio >= 1.0:
            _fail("warmup_ratio", self.warmup_ratio, "expected a number in [0, 1)")
        _float("label_smoothing", self.label_smoothing, minimum=0.0)
        if self.label_smoothing >= 1.0:
            _fail("label_smoothing", self.label_smoothing, "expected a number in [0, 1)")
        if self.class_weights is not None and self.class_weights != "balanced":
            weights = self.class_weights
            if (
                isinstance(weights, str)
                or not isinstance(weights, Iterable)
                or not weights
                or not all(
                    isinstance(w, (int, float))
                    and not isinstance(w, bool)
                    and math.isfinite(w)
                    and w >= 0
                    for w in weights
                )
                or not any(w > 0 for w in weights)
            ):
                _fail(
                    "class_weights",
                    weights,
                    "expected 'balanced', a list of non-negative weights (one per class), or null",
                )
            object.__setattr__(self, "class_weights", tuple(float(w) for w in weights))
        if not isinstance(self.lr_multipliers, Mapping):
            _fail("lr_multipliers", self.lr_multipliers, "expected a mapping {prefix: factor}")
        for prefix, factor in self.lr_multipliers.items():
            if not isinstance(prefix, str) or not prefix:
                _fail("lr_multipliers", self.lr_multipliers, "keys must be parameter-name prefixes")
            _float(f"lr_multipliers[{prefix!r}]", factor, minimum=0.0, strict=True)
        object.__setattr__(
            self, "lr_multipliers", {k: float(v) for k, v in self.lr_multipliers.items()}
        )
        if isinstance(self.frozen_parameters, str) or not all(
            isinstance(name, str) and name for name in self.frozen_parameters
        ):
            _fail(
                "frozen_parameters",
                self.frozen_parameters,
                "expected a list of parameter-name prefixes, e.g. ['backbone']",
            )
        object.__setattr__(self, "frozen_parameters", tuple(self.frozen_parameters))

    def _check_mode_settings(self) -> None:
        """Each mode's settings, by the rules beside them (`traineval.modes`)."""
        if not isinstance(self.mode_settings, Mapping):
            _fail("mode_settings", self.mode_settings, "expected {mode name: {setting: value}}")
        checked: dict[str, dict[str, Any]] = {}
        for name, settings in self.mode_settings.items():
            mode = registry.lookup(name, field="mode_settings key")
            if not isinstance(settings, Mapping):
                _fail(f"mode_settings.{name}", settings, "expected {setting: value}")
            full = mode.from_settings(settings).settings()
            checked[name] = {key: full[key] for key in settings}
        object.__setattr__(self, "mode_settings", checked)

    def _check_run(self) -> None:
        """Run-level settings, and the rules that relate two fields."""
        _float(
            "distributed_timeout_seconds", self.distributed_timeout_seconds, minimum=0, strict=True
        )
        if not isinstance(self.wandb_project, str) or not self.wandb_project:
            _fail("wandb_project", self.wandb_project, "expected a non-empty project name")
        if not isinstance(self.monitor_metric, str) or not re.fullmatch(
            r"(val|train)_\w+", self.monitor_metric
        ):
            _fail(
                "monitor_metric",
                self.monitor_metric,
                "expected 'val_<metric>' or 'train_loss', e.g. 'val_loss' or 'val_accuracy'",
            )
        if self.monitor_metric.startswith("train_") and self.monitor_metric != "train_loss":
            _fail("monitor_metric", self.monitor_metric, "the only train metric is 'train_loss'")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            _fail("output_dir", self.output_dir, "expected a path string or null")
        if not self.mixed_precision and self.precision in ("bf16", "fp16"):
            _fail(
                "precision",
                self.precision,
                "mixed_precision=false allows only 'auto' or 'fp32'; set mixed_precision=true",
            )
        if self.min_learning_rate >= self.learning_rate:
            _fail(
                "min_learning_rate",
                self.min_learning_rate,
                f"expected a value below learning_rate={self.learning_rate}",
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


_dataclass_init = TrainingConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_legacy_keys(self: TrainingConfig, *args: Any, **kwargs: Any) -> None:
    if any(key in LEGACY_MODE_KEYS for key in kwargs):
        moved = take_legacy_keys(kwargs, LEGACY_MODE_KEYS, "", stacklevel=3)
        kwargs["mode_settings"] = _merge_settings(kwargs.get("mode_settings") or {}, moved)
    _dataclass_init(self, *args, **kwargs)


TrainingConfig.__init__ = _init_with_legacy_keys  # type: ignore[method-assign]
TrainingConfig.legacy_keys = tuple(LEGACY_MODE_KEYS)


_MAXIMIZED = (
    "return",
    "reward",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "r2",
    "auc",
    "explained_variance",
    "bleu",
)


def metric_is_minimized(name: str) -> bool:
    """Guess a metric's direction from its name: losses and errors down, scores up."""
    return not any(token in name for token in _MAXIMIZED)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig(_ConfigBase):
    """Configuration for evaluation (the specification's `EvaluationConfig`)."""

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
    calibration_bins: int = 15
    # Bootstrap confidence intervals of the classification / regression metrics (0: off):
    # resamples of the evaluated samples, kept on the host while evaluating.
    bootstrap_samples: int = 0
    confidence_level: float = 0.95
    bootstrap_seed: int = 0
    ignore_index: int = -100
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("compute_metrics", "save_predictions", "plot_metrics"):
            _bool(name, getattr(self, name))
        _subset("classification_metrics", self.classification_metrics, CLASSIFICATION_METRICS)
        _subset("regression_metrics", self.regression_metrics, REGRESSION_METRICS)
        _subset("generation_metrics", self.generation_metrics, GENERATION_METRICS)
        _subset("multilabel_metrics", self.multilabel_metrics, MULTILABEL_METRICS)
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
        _int("calibration_bins", self.calibration_bins, minimum=1)
        _int("bootstrap_samples", self.bootstrap_samples, minimum=0)
        _int("bootstrap_seed", self.bootstrap_seed, minimum=0)
        _float("confidence_level", self.confidence_level, minimum=0.0, strict=True)
        if self.confidence_level >= 1.0:
            _fail("confidence_level", self.confidence_level, "expected a number in (0, 1)")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            _fail("ignore_index", self.ignore_index, "expected an integer")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            _fail("output_dir", self.output_dir, "expected a path string or null")


# -- YAML and dotted overrides -------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 would read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse one override value the way a YAML file would (`1e-3`, `true`, `[a, b]`, `null`)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.load(path.read_text(), Loader=_Loader)
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
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is invalid: expected key=value, e.g. seed=1")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r} is invalid: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(raw)
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
