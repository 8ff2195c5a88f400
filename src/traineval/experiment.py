"""Config-driven runs: data + model + training + test evaluation, as `traineval fit` runs them."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint_file
from .config import (
    EvaluationConfig,
    EvaluationMode,
    TrainingConfig,
    TrainingMode,
    _bool,
    _choice,
    _ConfigBase,
    _fail,
    _int,
    apply_overrides,
    load_yaml,
)
from .data import DataSplits, load_builtin, load_csv, make_splits
from .data.tables import BUILTIN_DATASETS
from .evaluation import Evaluator
from .imports import import_object
from .manager import TrainingManager, TrainingResult
from .models import build_model
from .seeding import seed_everything

logger = logging.getLogger(__name__)

DATA_SOURCES = (*BUILTIN_DATASETS, "csv", "custom")


@dataclasses.dataclass(frozen=True)
class DataConfig(_ConfigBase):
    """Where the data comes from and how it is split.

    `name`: a dataset scikit-learn ships (digits, iris, wine, breast_cancer, diabetes), `csv`
    (with `path` and `target`), or `custom` (with `factory`, an import path to a function
    returning `traineval.data.DataSplits`).
    """

    name: str = "digits"
    path: str | None = None
    target: str | None = None
    task: str = "auto"
    factory: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    standardize: bool = True
    image_shape: tuple[int, ...] | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATA_SOURCES)
        _choice("data.task", self.task, ("auto", "classification", "regression"))
        _int("data.split_seed", self.split_seed, minimum=0)
        _int("data.num_workers", self.num_workers, minimum=0)
        _bool("data.standardize", self.standardize)
        if self.name == "csv" and not (self.path and self.target):
            _fail("data.path", self.path, "data.name='csv' needs data.path and data.target")
        if self.name == "custom" and not self.factory:
            _fail("data.factory", self.factory, "data.name='custom' needs an import path")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
                _fail("data.image_shape", self.image_shape, "expected positive integers")
            object.__setattr__(self, "image_shape", shape)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_ConfigBase):
    """Which model: `mlp`, `cnn`, `autoencoder`, or `package.module:factory`; `options` are its
    keyword arguments (e.g. `hidden_sizes: [128, 64]`, `dropout: 0.1`)."""

    name: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("model.name", self.name, "expected 'mlp', 'cnn', 'autoencoder' or an import path")
        if not isinstance(self.options, Mapping):
            _fail("model.options", self.options, "expected a mapping of keyword arguments")


_SECTIONS: dict[str, type[_ConfigBase]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the YAML file of `traineval fit` has these sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    mode: str = "supervised"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("supervised", "unsupervised"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        allowed = [*_SECTIONS, "mode"]
        for key in data:
            if key not in allowed:
                raise ValueError(f"unknown section {key!r}; allowed: {', '.join(allowed)}")
        sections: dict[str, Any] = {}
        for key, section in _SECTIONS.items():
            try:
                sections[key] = section.from_dict(data.get(key) or {})
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
        return cls(**sections, mode=data.get("mode", "supervised"))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
        return cls.from_dict(apply_overrides(load_yaml(path), overrides))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key).to_dict() for key in _SECTIONS}
        out["mode"] = self.mode
        return out


def load_data(config: DataConfig) -> DataSplits:
    """Build the train / val / test splits a `DataConfig` describes."""
    if config.name == "custom":
        assert config.factory is not None
        splits = import_object(config.factory, field="data.factory")()
        if not isinstance(splits, DataSplits):
            raise ValueError(
                f"data.factory={config.factory!r} returned {type(splits).__name__}; expected "
                "traineval.data.DataSplits"
            )
        return splits
    if config.name == "csv":
        assert config.path is not None
        assert config.target is not None
        table = load_csv(config.path, config.target, config.task)
    else:
        table = load_builtin(config.name)
    return make_splits(
        table,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.split_seed,
        standardize=config.standardize,
        image_shape=config.image_shape,
    )


@dataclasses.dataclass
class ExperimentResult:
    training: TrainingResult
    test_metrics: dict[str, float] | None
    evaluated_checkpoint: str
    output_dir: str


def run_experiment(config: RunConfig, resume_from: str | None = None) -> ExperimentResult:
    """Train on the train split, pick the best checkpoint on val, evaluate it on test.

    Writes `config.yaml` (the whole run config), `metrics.jsonl`, `checkpoints/` and
    `evaluation/metrics.json` into the run directory.
    """
    t = config.training
    splits = load_data(config.data)
    mode = TrainingMode(config.mode)
    seed_everything(t.seed)  # the model's initial weights come from the run's seed
    model = build_model(
        config.model.name,
        input_shape=splits.input_shape,
        output_dim=splits.num_outputs,
        options=dict(config.model.options),
    )
    task_type = None if mode is TrainingMode.UNSUPERVISED else splits.task_type
    workers = config.data.num_workers
    pin = torch.cuda.is_available()

    def loader(dataset: Any, batch_size: int, shuffle: bool) -> DataLoader[Any] | None:
        if dataset is None:
            return None
        generator = torch.Generator().manual_seed(t.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=pin,
            generator=generator,
            persistent_workers=workers > 0,
        )

    manager = TrainingManager(t)
    evaluator = Evaluator(config.evaluation)
    train_loader = loader(splits.train, t.batch_size, shuffle=True)
    assert train_loader is not None
    result = manager.train(
        model,
        train_loader,
        loader(splits.val, t.effective_eval_batch_size, shuffle=False),
        task_type=task_type,
        evaluator=evaluator,
        mode=mode,
        resume_from=resume_from,
    )
    out = Path(result.output_dir)
    resolved = config.to_dict()
    resolved["training"]["output_dir"] = result.output_dir
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    evaluated = "final weights"
    best = result.checkpoints.get("best")
    if best:
        model.load_state_dict(load_checkpoint_file(best, map_location=manager.device)["model"])
        evaluated = f"best checkpoint (epoch {result.best_epoch})"
    test_metrics = None
    test_loader = loader(splits.test, t.effective_eval_batch_size, shuffle=False)
    if test_loader is not None:
        test_metrics = evaluator.evaluate_model(
            model,
            test_loader,
            manager.device,
            task_type=task_type,
            training_mode=mode,
            split=EvaluationMode.TESTING,
            output_dir=out,
        )
    record: dict[str, Any] = {
        "evaluated": evaluated,
        "best_val": result.best_metric,
        "monitor_metric": result.monitor_metric,
        "test": test_metrics,
    }
    if test_metrics is not None and evaluator.last_confusion_matrix is not None:
        record["test_confusion_matrix"] = evaluator.last_confusion_matrix.tolist()
        record["class_names"] = splits.class_names
    (out / "evaluation").mkdir(exist_ok=True)
    (out / "evaluation" / "metrics.json").write_text(json.dumps(record, indent=2))
    return ExperimentResult(result, test_metrics, evaluated, str(out))
