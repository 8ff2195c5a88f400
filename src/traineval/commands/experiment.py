"""Config-driven runs: data + model + training + test evaluation, as `traineval fit` runs them."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..assembly.build import check_resume_target
from ..assembly.cross_validation import Folds, cross_validate
from ..assembly.evaluator import Evaluator
from ..assembly.manager import TrainingManager, TrainingResult
from ..config import code_references as imports
from ..config.code_references import (
    CODE_PATHS_FILE,
    add_search_path,
    called,
    code_references,
    import_object,
    refusal,
    untrusted,
)
from ..config.config_file import write_run_config
from ..config.training_config import (
    LEGACY_MODE_KEYS,
    MAX_SEED,
    EvaluationConfig,
    EvaluationMode,
    TaskType,
    TrainingConfig,
    _bool,
    _choice,
    _ConfigBase,
    _fail,
    _float,
    _int,
    apply_overrides,
    load_yaml,
    take_legacy_keys,
)
from ..data import DataSplits, load_builtin, load_csv, make_splits
from ..data.splits import SCHEMA_FILE
from ..data.tables import BUILTIN_DATASETS, Columns
from ..evaluation.model_evaluator import SPLIT_PREFIX, EvaluationOptions, EvaluationReport
from ..loggers.jsonl import log_evaluation
from ..models import MODELS, build_model, refuse_unknown_options
from ..modes import Mode, Supervised, mode_class
from ..modes.contract import refuse_resources_without_factory
from ..runs.checkpoint import (
    default_checkpoint,
    load_checkpoint_file,
    load_model_weights,
    run_checkpoint,
)
from ..runs.rundir import CV_SUMMARY, default_run_dir, held_here, in_use, is_cross_validation
from ..system import cpu_threads
from ..system.distributed import is_sharded, model_state
from ..system.files import atomic_write_json, read_json_or_none
from ..system.seeding import seed_everything
from ..training.batches import in_eval_mode
from ..training.lr_finder import LearningRateSearch
from ..training.stopping import TrainingInterrupted, stop_if_signalled, watching_signals

logger = logging.getLogger(__name__)

DATA_SOURCES = (*BUILTIN_DATASETS, "csv", "custom")
DATA_SCHEMA = SCHEMA_FILE  # a table run's features, scaling, categories and classes
# where the run's own code was found (the config file's folder): evaluate and predict look
# there too, under --trust-code
CODE_PATHS = CODE_PATHS_FILE


@dataclasses.dataclass(frozen=True)
class DataConfig(_ConfigBase):
    """Where the data comes from and how it is split.

    `name`: a dataset scikit-learn ships (digits, iris, wine, breast_cancer, diabetes), `csv`
    (with `path` and `target`: a column, or a list of columns for multi-label 0/1 indicators
    or several regression outputs; `task` says which when `auto` should not guess), or
    `custom` (with `factory`, an import path to a function returning
    `traineval.data.DataSplits`). A CSV's feature columns are every other column (each must
    hold numbers), or `features` (a list); `exclude` leaves columns out; `id_column` names
    the column whose values identify each row in predictions files (default: the CSV line
    number);
    `categorical` columns hold text, one-hot encoded with the categories of the training
    split (a category it lacks is none of them).
    `labeled_fraction` < 1 keeps the labels of that share of
    the training rows, stratified by class and drawn with `split_seed`: semi-supervised mode
    marks the other rows with its `unlabeled_label`, supervised mode leaves them out (the
    baseline to compare with). In meta_learning mode each split becomes few-shot tasks (the
    mode's `ways`, `shots`, `queries`, `train_episodes`, `eval_episodes`).
    """

    name: str = "digits"
    path: str | None = None
    target: str | tuple[str, ...] | None = None
    features: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    id_column: str | None = None
    categorical: tuple[str, ...] = ()
    task: str = "auto"
    factory: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    standardize: bool = True
    image_shape: tuple[int, ...] | None = None
    num_workers: int = 0
    labeled_fraction: float = 1.0

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATA_SOURCES)
        _choice("data.task", self.task, ("auto", "classification", "regression", "multilabel"))
        if self.target is not None and not isinstance(self.target, str):
            names = self.target
            if (
                not isinstance(names, (list, tuple))
                or not names
                or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)
            ):
                _fail("data.target", names, "expected a column name or a list of distinct names")
            object.__setattr__(self, "target", tuple(names))
        for field in ("features", "exclude", "categorical"):
            object.__setattr__(self, field, _column_names(f"data.{field}", getattr(self, field)))
        if self.id_column is not None and not (isinstance(self.id_column, str) and self.id_column):
            _fail("data.id_column", self.id_column, "expected a column name")
        _int("data.split_seed", self.split_seed, minimum=0, maximum=MAX_SEED)
        _int("data.num_workers", self.num_workers, minimum=0)
        _bool("data.standardize", self.standardize)
        _float("data.labeled_fraction", self.labeled_fraction, minimum=0.0, strict=True)
        if self.labeled_fraction > 1.0:
            _fail("data.labeled_fraction", self.labeled_fraction, "expected a number in (0, 1]")
        self._check_source_fields()
        if self.name == "csv" and not (self.path and self.target):
            _fail("data.path", self.path, "data.name='csv' needs data.path and data.target")
        if self.name == "custom" and not self.factory:
            _fail("data.factory", self.factory, "data.name='custom' needs an import path")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
                _fail("data.image_shape", self.image_shape, "expected positive integers")
            object.__setattr__(self, "image_shape", shape)

    def _check_source_fields(self) -> None:
        """A field only another source reads is refused: `path` without name csv trained
        the default digits, whatever the file held (or when it did not exist)."""
        defaults = DataConfig.__dataclass_fields__
        only = {"csv": _CSV_ONLY, "custom": ("factory",)}
        for source, fields in only.items():
            for field in fields if self.name != source else ():
                value = getattr(self, field)
                if value != defaults[field].default:
                    hint = " (the default name is digits)" if self.name == "digits" else ""
                    _fail(
                        f"data.{field}",
                        value,
                        f"only data.name={source!r} reads it, and data.name is "
                        f"{self.name!r}{hint}: set name: {source}, or leave {field} out",
                    )
        for field in _SPLIT_FIELDS if self.name == "custom" else ():
            value = getattr(self, field)
            if value != defaults[field].default:
                _fail(
                    f"data.{field}",
                    value,
                    "data.name='custom' takes the splits your factory returns as they are; "
                    f"make them there, and leave {field} out",
                )


_RECONSTRUCTING = ("autoencoder", "vae")
_PREDICTING = ("mlp", "cnn")
_CSV_ONLY = ("path", "target", "features", "exclude", "id_column", "categorical", "task")
# (split_seed stays: labeled_fraction and the modes' own draws read it for every source)
_SPLIT_FIELDS = ("val_fraction", "test_fraction", "standardize", "image_shape")


def _column_names(field: str, value: Any) -> tuple[str, ...] | None:
    """A list of distinct column names as a tuple; None stays None for `data.features`
    (every column) and is no columns for the other lists."""
    if value is None:
        return None if field == "data.features" else ()
    if isinstance(value, str) or not all(isinstance(n, str) and n for n in value):
        _fail(field, value, "expected a list of column names")
    if len(set(value)) != len(value):
        _fail(field, value, "expected each column named once")
    return tuple(value)


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
        if self.name in MODELS:  # before any work (a tune study's first trial, say)
            refuse_unknown_options(self.name, self.options)
        elif ":" not in self.name:  # not an import path: a typo of a built-in's name?
            close = difflib.get_close_matches(self.name, MODELS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(
                "model.name",
                self.name,
                f"expected one of {', '.join(MODELS)}, or an import path "
                f"'package.module:factory'{hint}",
            )


_SECTIONS: dict[str, type[_ConfigBase]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
}
_SECTION_EXAMPLES = {
    "data": "data: {name: iris}",
    "model": "model: {name: mlp}",
    "training": "training: {num_epochs: 5}",
    "evaluation": "evaluation: {save_predictions: true}",
}


# Mode settings that earlier versions kept in the data section -> (mode, setting)
LEGACY_DATA_KEYS: dict[str, tuple[str, str]] = {
    "environment": ("reinforcement", "environment"),
    **{key: ("meta_learning", key) for key in ("ways", "shots", "queries")},
    **{key: ("meta_learning", key) for key in ("train_episodes", "eval_episodes")},
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the YAML file of `traineval fit` has these sections.

    `mode` is the training mode with its settings: in YAML a name (`mode: federated`) or a
    section (`mode: {name: federated, clients: 10}`); see `traineval.modes`.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    mode: Mode = dataclasses.field(default_factory=Supervised)

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            _fail("mode", self.mode, "expected a traineval Mode, e.g. Federated(clients=10)")
        if self.evaluation.output_dir is not None:
            _fail(
                "evaluation.output_dir",
                self.evaluation.output_dir,
                "a config-file run writes its evaluation into <training.output_dir>/"
                "evaluation; leave evaluation.output_dir out (it is the Python Evaluator's)",
            )
        self.mode.check_config_run()
        if self.data.labeled_fraction < 1.0 and self.mode.reconstructs:
            _fail(
                "data.labeled_fraction",
                self.data.labeled_fraction,
                f"hiding labels needs mode: semi_supervised or supervised (mode is "
                f"{self.mode.name!r})",
            )
        self._check_model_fits_mode()

    def _check_model_fits_mode(self) -> None:
        """A built-in model that answers another question than the mode asks: an
        autoencoder in supervised mode trained its reconstructions as class scores, and
        failed only at the test; an MLP in unsupervised mode failed at its first batch."""
        name, mode = self.model.name, self.mode
        if name in _RECONSTRUCTING and not mode.reconstructs:
            _fail(
                "model.name",
                name,
                f"it reconstructs its input, and mode {mode.name!r} trains on the targets: "
                "use mode: unsupervised, or a model that predicts the targets (mlp, cnn)",
            )
        if name in _PREDICTING and mode.reconstructs:
            _fail(
                "model.name",
                name,
                f"mode {mode.name!r} compares the model's outputs with its inputs, and "
                f"{name} predicts the targets: use model: autoencoder or vae",
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        allowed = [*_SECTIONS, "mode"]
        for key in data:
            if key not in allowed:
                hint = " (the search space is read by `traineval tune`)" if key == "search" else ""
                raise ValueError(f"unknown section {key!r}; allowed: {', '.join(allowed)}{hint}")
        for key in _SECTIONS:
            if not isinstance(data.get(key) or {}, Mapping):
                raise ValueError(
                    f"section {key!r} is {data[key]!r}; it must be a mapping of its fields "
                    f"(e.g. {_SECTION_EXAMPLES[key]})"
                )
        given = {key: dict(data.get(key) or {}) for key in _SECTIONS}
        moved = take_legacy_keys(given["data"], LEGACY_DATA_KEYS, "data.", stacklevel=3)
        flat = take_legacy_keys(given["training"], LEGACY_MODE_KEYS, "training.", stacklevel=3)
        for name, settings in flat.items():
            moved.setdefault(name, {}).update(settings)
        sections: dict[str, Any] = {}
        for key, section in _SECTIONS.items():
            try:
                sections[key] = section.from_dict(given[key])
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
        mode, rest = _mode_section(data.get("mode", "supervised"), sections["training"], moved)
        sections["training"] = sections["training"].replace(mode_settings=rest)
        return cls(**sections, mode=mode)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
        """A config file's run, with `key=value` overrides; a file that says nothing (empty,
        or comments only) without overrides is refused: it trained 100 epochs of digits."""
        data = load_yaml(path)
        if not data and not overrides:
            raise ValueError(
                f"config file {str(path)!r} is empty: it would train every default (100 epochs "
                "of digits); give its sections (data, model, training, ...), or key=value "
                "overrides, or run `traineval demo`"
            )
        return cls.from_data(data, overrides)

    @classmethod
    def from_data(cls, data: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
        """A config read from YAML (`mode: federated` as a name or a section), with dotted
        `key=value` overrides applied."""
        data = _mode_as_section(dict(data))
        for override in overrides:  # one at a time: `mode=x` then `mode.y=z` works
            data = _mode_as_section(apply_overrides(data, [override]))
        return cls.from_dict(data)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, *, trust_code: bool = False) -> RunConfig:
        """A run directory's `config.yaml`, read as untrusted input: an import path in it
        (a model factory, a data factory, a mode's function, a gymnasium `module:Env` id)
        is refused before anything is imported, unless `trust_code=True`."""
        path = Path(run_dir) / "config.yaml"
        if not Path(run_dir).exists():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory: it does not exist")
        if Path(run_dir).is_dir() and not path.exists():
            _refuse_study(Path(run_dir))
            raise FileNotFoundError(
                f"{str(run_dir)!r} is not a run directory: it has no config.yaml (fit, demo "
                "and cv write one in each run's folder)"
            )
        data = _as_recorded(_mode_as_section(load_yaml(path)))
        if set(data) == {"training", "mode"} and is_fold(Path(run_dir)):
            return cls._fold(Path(run_dir).resolve(), trust_code)
        if set(data) == {"training", "mode"}:  # what `open_loggers` writes for train()
            raise ValueError(
                f"{path} records a run trained from Python (train() or TrainingManager): its "
                "training settings and mode, not its data or model, which were Python "
                "objects; evaluate it from Python: load checkpoints/best.pt into your model "
                "with traineval.runs.checkpoint.load_model_weights and score it with Evaluator"
            )
        found = code_references(data, ("data", "model", "mode", "evaluation"))
        if found and not trust_code:
            raise refusal(found, str(path))
        if found:  # trusted: the folders `fit` found the code in (beside its config file)
            recorded = read_json_or_none(Path(run_dir) / CODE_PATHS)
            folders = recorded.get("search_paths") if isinstance(recorded, dict) else None
            for folder in reversed(folders if isinstance(folders, list) else []):
                if isinstance(folder, str) and Path(folder).is_dir():
                    add_search_path(folder)
        with untrusted(str(path), trust_code=trust_code):
            return cls.from_dict(data)

    @classmethod
    def _fold(cls, fold: Path, trust_code: bool) -> RunConfig:
        """A fold of a `traineval cv` run: the cross-validation's config (its data, model
        and evaluation), with the fold's folder as the output_dir. A cross-validation from
        Python (or one stopped before its end) recorded no data or model: refused."""
        base = fold.parent
        if not (base / "evaluation" / "cv.json").is_file():
            raise ValueError(
                f"{fold} is a fold of the cross-validation in {base}, which recorded no data "
                "or model (run from Python, or stopped before its end): score it from Python "
                f"(Evaluator.evaluate_ensemble with the fold_checkpoints of {base / CV_SUMMARY})"
            )
        whole = cls.from_run_dir(base, trust_code=trust_code)
        return dataclasses.replace(whole, training=whole.training.replace(output_dir=str(fold)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key).to_dict() for key in _SECTIONS}
        if not out["training"]["mode_settings"]:
            del out["training"]["mode_settings"]
        out["mode"] = self.mode.to_dict()
        return out


def _as_recorded(data: dict[str, Any]) -> dict[str, Any]:
    """A run's record as it trained: fields an earlier version took and ignored (and this
    one refuses for a new run: a source's fields under another source, the Python
    Evaluator's output_dir) are dropped, so its run directory still evaluates."""
    section = data.get("data")
    if isinstance(section, Mapping):
        name = section.get("name", "digits")
        unused = set(_CSV_ONLY if name != "csv" else ())
        unused |= {"factory"} if name != "custom" else set(_SPLIT_FIELDS)
        data = {**data, "data": {k: v for k, v in section.items() if k not in unused}}
    evaluation = data.get("evaluation")
    if isinstance(evaluation, Mapping) and "output_dir" in evaluation:
        data = {**data, "evaluation": {k: v for k, v in evaluation.items() if k != "output_dir"}}
    return data


def _refuse_given_twice(
    name: str, own: Mapping[str, Any], settings: Mapping[str, Any], flat: Mapping[str, Any]
) -> None:
    """A setting of the mode section given also, with another value, by
    training.mode_settings or by a deprecated flat key: refused naming both (one of them
    lost silently, the command line's override included)."""
    others = [(f"training.mode_settings.{name}.{k}", k, v) for k, v in settings.items()]
    others += [(_flat_key(name, k), k, v) for k, v in flat.items()]
    for where, key, value in others:
        if key in own and own[key] != value:
            _fail(f"mode.{key}", own[key], f"also given by {where} as {value!r}; keep one")


def _flat_key(mode: str, setting: str) -> str:
    """The deprecated flat key that names `mode`'s `setting` (e.g. training.rl_gamma)."""
    for table, section in ((LEGACY_MODE_KEYS, "training"), (LEGACY_DATA_KEYS, "data")):
        for key, (owner, name) in table.items():
            if (owner, name) == (mode, setting):
                return f"{section}.{key}"
    return "a deprecated flat key"


def _mode_as_section(data: dict[str, Any]) -> dict[str, Any]:
    """`mode: federated` as `mode: {name: federated}`, so `mode.clients=5` can override."""
    if isinstance(data.get("mode"), str):
        data = {**data, "mode": {"name": data["mode"]}}
    return data


def _mode_section(
    value: Any, training: TrainingConfig, moved: Mapping[str, Mapping[str, Any]]
) -> tuple[Mode, dict[str, dict[str, Any]]]:
    """The run's Mode from the `mode` section, with the settings the training and data
    sections gave it under their deprecated flat names; and the other modes' settings."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        _fail("mode", value, "expected a mode name, or a section {name: <mode>, <setting>: ...}")
    name = value["name"]
    cls = mode_class(name, field="mode.name")
    own = {k: v for k, v in value.items() if k != "name"}
    _refuse_given_twice(name, own, training.mode_settings.get(name, {}), moved.get(name, {}))
    settings = {**training.mode_settings.get(name, {}), **moved.get(name, {}), **own}
    rest = {k: dict(v) for k, v in training.mode_settings.items() if k != name}
    for other, values in moved.items():
        if other != name:
            rest.setdefault(other, {}).update(values)
    try:
        refuse_resources_without_factory(cls)  # a config file gives no objects
        return cls.from_settings(settings), rest
    except ValueError as error:
        raise ValueError(f"mode: {error}") from None


def load_data(config: DataConfig) -> DataSplits:
    """Build the train / val / test splits a `DataConfig` describes."""
    if config.name == "custom":
        assert config.factory is not None
        splits = called(import_object(config.factory, field="data.factory"), "data.factory")
        if not isinstance(splits, DataSplits):
            raise ValueError(
                f"data.factory={config.factory!r} returned {type(splits).__name__}; expected "
                "traineval.data.DataSplits"
            )
        return splits
    if config.name == "csv":
        assert config.path is not None
        assert config.target is not None
        columns = Columns(config.features, config.exclude, config.id_column, config.categorical)
        table = load_csv(config.path, config.target, config.task, columns)
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
    test_intervals: dict[str, Any] | None = None  # with evaluation.bootstrap_samples


@dataclasses.dataclass
class RunParts:
    """What every config-driven command builds from a RunConfig."""

    config: RunConfig
    splits: DataSplits
    mode: Mode
    task_type: TaskType | None

    def new_model(self) -> torch.nn.Module:
        name = self.config.model.name
        model = build_model(
            name,
            input_shape=self.splits.input_shape,
            output_dim=self.splits.num_outputs,
            options=self.mode.model_options(name, dict(self.config.model.options), self.splits),
        )
        if ":" in name and self.task_type is TaskType.CLASSIFICATION and self.mode.supervised_loss:
            _refuse_other_classes(model, name, self.splits)
        return model

    def loader(self, dataset: Any, shuffle: bool = False) -> Any:
        """A loader over `dataset`; a mode's own data (an environment) as it is."""
        if dataset is None or not self.mode.uses_data:
            return dataset
        t = self.config.training
        return DataLoader(
            dataset,
            batch_size=t.batch_size if shuffle else t.effective_eval_batch_size,
            shuffle=shuffle,
            num_workers=self.config.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            # a seeded generator of its own: the shuffle order is part of exact resume
            generator=torch.Generator().manual_seed(t.seed) if shuffle else None,
        )


def _refuse_other_classes(model: torch.nn.Module, name: str, splits: DataSplits) -> None:
    """A classifier your factory built gives one score per class of the data: one that
    ignored `output_dim` trained and reported classes the data does not have. (Checked on
    two zero inputs, where a model takes float inputs of the data's shape.)"""
    try:
        with in_eval_mode(model), torch.no_grad():
            outputs = model(torch.zeros(2, *splits.input_shape))
    except Exception:  # inputs of another kind (token ids, a dict): not checked here
        return
    wide = outputs.shape[1] if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 else None
    if wide is not None and wide != splits.num_outputs:
        raise ValueError(
            f"model.name={name!r} built a model of {wide} outputs, and the data has "
            f"{splits.num_outputs} classes: the factory must give output_dim outputs (it was "
            f"called with output_dim={splits.num_outputs})"
        )


def run_parts(config: RunConfig) -> RunParts:
    """The data splits (labels hidden, or cut into tasks, as the mode asks), the task and
    a model builder of a config, with the run's seed set for the initial weights."""
    mode = config.mode
    splits = mode.prepare(load_data(config.data) if mode.uses_data else None, config.data)
    seed_everything(config.training.seed)  # initial weights come from the run's seed
    return RunParts(config, splits, mode, mode.task_of(splits))


def run_experiment(
    config: RunConfig, resume_from: str | None = None, callbacks: Sequence[Any] = ()
) -> ExperimentResult:
    """Train on the train split, pick the best checkpoint on val, evaluate it on test.

    Writes `config.yaml` (the whole run config), `metrics.jsonl`, `checkpoints/` and
    `evaluation/metrics.json` (plus predictions and plots when configured) into the run
    directory. `callbacks` join the run's own (e.g. a study's pruning callback).
    """
    parts = run_parts(config)
    check_resume_target(config.training, resume_from)  # before the folder is made
    manager = TrainingManager(config.training)
    manager.run_config = config.to_dict()
    if config.data.name != "custom" and parts.splits.feature_names is not None:
        manager.run_files[DATA_SCHEMA] = parts.splits.schema()  # what predict applies
    if code_references(config.to_dict(), ("data", "model", "mode", "evaluation")):
        manager.run_files[CODE_PATHS] = {"search_paths": list(imports.SEARCH_PATHS)}
    model = parts.new_model()
    with (
        watching_signals(),  # training and testing: a signal in either interrupts the run
        manager.hold_output_dir(),  # the run, then its records and test evaluation
        cpu_threads.applied(config.training.cpu_threads, manager.device, model),
    ):
        return _train_and_test(config, parts, manager, model, resume_from, callbacks)


def _stop_if_signalled(out: Path, during: str) -> None:
    """A signal that came after training (in on_train_end, the test evaluation): record the
    run as interrupted and stop before writing test results (the resume tests it)."""
    try:
        checkpoints = [out / "checkpoints" / f"{name}.pt" for name in ("last", "best")]
        found = next((str(path) for path in checkpoints if path.exists()), None)
        stop_if_signalled(found, during)
    except TrainingInterrupted as stopped:
        summary = read_json_or_none(out / "summary.json") or {}
        summary.update(status="interrupted", stop_reason=str(stopped))
        atomic_write_json(out / "summary.json", summary)
        raise


def _whole_model(
    model: torch.nn.Module, parts: RunParts, manager: TrainingManager
) -> torch.nn.Module:
    """The trained model, whole on rank 0: an FSDP model's full weights gathered into a
    fresh one (every rank takes part); any other model itself."""
    if not is_sharded(model):
        return model
    weights = model_state(model)
    whole = parts.new_model()
    if manager.distributed.is_main:
        whole.load_state_dict(weights)
        whole.to(manager.device)
    return whole


def _test_details(
    tested: EvaluationReport, parts: RunParts, evaluator: Evaluator
) -> dict[str, Any]:
    """What metrics.json holds of the test evaluation beside its metrics: the confusion
    matrix with the class names, per-class metrics, bootstrap intervals (where computed)."""
    details: dict[str, Any] = {}
    if tested.confusion is not None:
        details["test_confusion_matrix"] = tested.confusion.tolist()
        details["class_names"] = parts.splits.class_names
    if tested.per_class is not None:
        details["test_per_class"] = tested.per_class
    if tested.intervals:
        details["test_intervals"] = tested.intervals_record(evaluator.config)
    return details


def _train_and_test(
    config: RunConfig,
    parts: RunParts,
    manager: TrainingManager,
    model: torch.nn.Module,
    resume_from: str | None,
    callbacks: Sequence[Any],
) -> ExperimentResult:
    """Train `model` (resuming when asked), then on rank 0 evaluate the best weights on the
    test split and write evaluation/metrics.json (and the learning curves)."""
    evaluator = Evaluator(config.evaluation)
    train_loader = parts.loader(parts.splits.train, shuffle=True)
    assert train_loader is not None
    result = manager.train(
        model,
        train_loader,
        parts.loader(parts.splits.val),
        task_type=parts.task_type,
        evaluator=evaluator,
        mode=parts.mode,
        resume_from=resume_from,
        callbacks=callbacks,
    )
    out = Path(result.output_dir)
    _stop_if_signalled(out, "the end of training")
    model = _whole_model(model, parts, manager)
    if not manager.distributed.is_main:  # rank 0 evaluates on the whole test split
        return ExperimentResult(result, None, "evaluated by rank 0", str(out))
    if result.status == "time limit":  # not finished: the test is for the resumed run's end
        return ExperimentResult(result, None, "not tested: resume to finish", str(out))
    evaluated = _record_and_load_best(config, result, model, manager.device)
    if config.evaluation.plot_metrics:
        from ..reporting import plots

        plots.optional(
            plots.learning_curves,
            result.training_history,
            out / "evaluation" / "learning_curves.png",
        )
    tested = None
    if parts.splits.test is not None:
        tested = _evaluate_split(parts, evaluator, model, out, manager.device)
        scored = "best.pt" if evaluated.startswith("best") else "final weights"
        _log_evaluation(out, EvaluationMode.TESTING, tested.metrics, scored)
    _stop_if_signalled(out, "the test evaluation")
    test_metrics = tested.metrics if tested is not None else None
    record: dict[str, Any] = {
        "evaluated": evaluated,
        "best_val": result.best_metric,
        "monitor_metric": result.monitor_metric,
        "test": test_metrics,
    }
    if tested is not None:
        record.update(_test_details(tested, parts, evaluator))
    (out / "evaluation").mkdir(exist_ok=True)
    atomic_write_json(out / "evaluation" / "metrics.json", record)
    figure = out / "evaluation" / "confusion_matrix_test.png"
    if config.training.tensorboard_logging and figure.exists():
        _figure_to_tensorboard(out, "test_confusion_matrix", figure, result.global_step)
    return ExperimentResult(result, test_metrics, evaluated, str(out), record.get("test_intervals"))


def find_learning_rate(
    config: RunConfig, *, min_lr: float, max_lr: float, num_steps: int
) -> tuple[LearningRateSearch, Path]:
    """The learning-rate range test on a config's model and train split; writes
    `lr_find.json` and `lr_find.png` into training.output_dir (default runs/lr-find-<time>)
    and returns the search and that folder."""
    if not config.mode.uses_data:
        raise ValueError(
            f"traineval lr-find does not run mode: {config.mode.name} (it makes its own "
            "data, e.g. a policy objective whose scale moves with the returns, not a curve "
            "to read a rate from)"
        )
    parts = run_parts(config)
    manager = TrainingManager(config.training)
    train_loader = parts.loader(parts.splits.train, shuffle=True)
    assert train_loader is not None
    search = manager.find_learning_rate(
        parts.new_model(),
        train_loader,
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        task_type=parts.task_type,
        mode=parts.mode,
    )
    folder = Path(config.training.output_dir or default_run_dir("lr-find"))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "lr_find.json", search.to_dict())
    from ..reporting import plots

    plots.optional(search.plot, folder / "lr_find.png")
    return search, folder


def _record_and_load_best(
    config: RunConfig, result: TrainingResult, model: torch.nn.Module, device: torch.device
) -> str:
    """Write the whole run config into the run directory; load the best checkpoint, if any.

    Returns which weights `model` now holds, for the evaluation record.
    """
    out = Path(result.output_dir)
    write_run_config(config.to_dict(), out)
    best = out / "checkpoints" / "best.pt"
    if not best.exists():
        return "final weights"
    payload = load_checkpoint_file(best, map_location=device)
    model.load_state_dict(payload["model"])
    return f"best checkpoint (epoch {payload['epoch']})"


def _figure_to_tensorboard(run_dir: Path, tag: str, png: Path, step: int) -> None:
    """Add a saved plot to the run's TensorBoard images (skipped if TensorBoard is absent)."""
    try:
        from matplotlib import image
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    writer.add_image(tag, image.imread(png)[..., :3], step, dataformats="HWC")
    writer.close()


def _evaluate_split(
    parts: RunParts,
    evaluator: Evaluator,
    model: torch.nn.Module,
    out: Path,
    device: torch.device,
    split: EvaluationMode = EvaluationMode.TESTING,
) -> EvaluationReport:
    """Evaluate on one of the run's splits (which must exist)."""
    prefix = SPLIT_PREFIX[split]
    loader = parts.loader(getattr(parts.splits, prefix))
    own = parts.mode.score(model, loader, device, seed=parts.config.training.seed)
    if own is not None:  # e.g. meta-learning: adapt to each task, score its queries
        report = EvaluationReport(dict(own), parts.task_type or TaskType.CLASSIFICATION)
    else:
        options = EvaluationOptions(
            training_mode=parts.mode.evaluated_as,
            class_names=parts.splits.class_names,
            row_ids=parts.splits.ids_of(prefix),  # the predictions join back to the table
            task_type=parts.task_type,
            split=split,
        )
        report = evaluator.evaluate(model, loader, options, device=device, output_dir=out)
    return report


def _log_evaluation(
    out: Path, split: EvaluationMode, metrics: Mapping[str, Any], checkpoint: str
) -> None:
    """The split-tagged record of an evaluation of `checkpoint` (a file name, or "final
    weights") in metrics.jsonl, at the run's last step: in place of an earlier evaluation of
    the same checkpoint and split, or after it while another process's run appends there."""
    prefix = SPLIT_PREFIX[split]
    summary = read_json_or_none(out / "summary.json")
    step = summary.get("global_step", 0) if isinstance(summary, dict) else 0
    record = {"event": "eval", "split": prefix, "checkpoint": checkpoint,
              **{f"{prefix}_{k}": v for k, v in metrics.items()}}  # fmt: skip
    alone = held_here(out) or not in_use(out)  # (a run of this process: its log is closed)
    log_evaluation(out / "metrics.jsonl", record, step if isinstance(step, int) else 0, alone=alone)


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    save_predictions: bool = False,
    plot_metrics: bool = False,
    trust_code: bool = False,
) -> tuple[dict[str, float], str]:
    """Evaluate a finished run's checkpoint on one of its data splits (`traineval evaluate`).

    `checkpoint`: "best", "last", "epoch-NNNN", "final" (a Flower run's final weights) or a
    path; by default the best, or the final weights of a run that keeps no best. The run's
    `config.yaml` rebuilds the same data splits and model. Returns the metrics and the path
    of the metrics file written into `<run_dir>/evaluation/`. A run directory is untrusted
    input: one whose config names code to import (a custom model or data factory) is
    refused unless `trust_code=True` (see `RunConfig.from_run_dir`).
    """
    run_dir = Path(run_dir)
    config = RunConfig.from_run_dir(run_dir, trust_code=trust_code)
    _refuse_linked_outputs(run_dir)
    with untrusted(str(run_dir / "config.yaml"), trust_code=trust_code):
        return _evaluate_run(
            config, run_dir, checkpoint or default_checkpoint(run_dir), split,
            save_predictions, plot_metrics,
        )  # fmt: skip


def _refuse_linked_outputs(run_dir: Path) -> None:
    """Refuse to write through a symbolic link where evaluate writes into a run directory
    (its `evaluation/` folder, and `metrics.jsonl`, which it appends to): a run directory
    handed to you could point them anywhere (its result files are replaced, not followed)."""
    for path in (run_dir / "evaluation", run_dir / "metrics.jsonl"):
        if path.is_symlink():
            raise ValueError(
                f"{str(path)!r} is a symbolic link (to {str(path.readlink())!r}): evaluate "
                "writes there, and only into files of the run's own; replace the link by "
                "the file or folder (or copy the run directory), then run again"
            )


def recorded_in(run_dir: Path) -> Path:
    """The folder holding a run's data.json and code paths: its own, or for a fold of a
    `traineval cv` run the cross-validation's."""
    return run_dir.resolve().parent if is_fold(run_dir) else run_dir


def is_fold(run_dir: Path) -> bool:
    """Whether `run_dir` is a fold-<k> folder of a cross-validation."""
    run_dir = run_dir.resolve()  # (`traineval evaluate .` inside a fold)
    return run_dir.name.startswith("fold-") and is_cross_validation(run_dir.parent)


def _refuse_a_changed_table(run_dir: Path, config: RunConfig, splits: DataSplits) -> None:
    """The data read again is the data the run trained on: its `data.json` (the training
    split's scaling, categories, classes) says so. A table changed since (rows shuffled,
    added, a class more) was split again without a word: another test split."""
    saved = read_json_or_none(recorded_in(run_dir) / DATA_SCHEMA)
    if not isinstance(saved, dict):
        return
    now = splits.schema()
    differ = [key for key in now if key in saved and saved[key] != now[key]]
    if "split_digests" in differ and isinstance(saved["split_digests"], dict):
        rows = [
            f"the {name} rows"
            for name, digest in (now["split_digests"] or {}).items()
            if saved["split_digests"].get(name) != digest
        ]
        differ[differ.index("split_digests")] = ", ".join(rows) or "the rows"
    where = f"data.path={str(config.data.path)!r}" if config.data.path else "the data"
    names, known = now.get("feature_names"), saved.get("feature_names")
    if (
        "feature_names" in differ
        and isinstance(names, list)
        and isinstance(known, list)
        and sorted(map(str, names)) == sorted(map(str, known))
    ):
        raise ValueError(
            f"{where} has the run's columns in another order: the run read them as "
            f"{', '.join(map(str, known[:8]))}{' ...' if len(known) > 8 else ''}; put them "
            "back in that order"
        )
    if differ:
        raise ValueError(
            f"{where} is not the data this run trained on: {', '.join(differ)} differ "
            f"from the run's {DATA_SCHEMA} (rows changed, added or reordered since); its "
            "splits would not be the run's: evaluate with the data it trained on"
        )


def _refuse_study(folder: Path) -> None:
    """A tune study's folder holds trials, not a model of its own: say which to use."""
    trials = sorted(p.name for p in folder.glob("trial-*") if (p / "config.yaml").is_file())
    if trials or (folder / "study.db").is_file():
        which = f", {folder / trials[0]}" if trials else ""
        which += f" .. {trials[-1]}" if len(trials) > 1 else ""
        raise ValueError(
            f"{str(folder)!r} is a tune study: it has no model of its own; use one of its "
            f"trials{which} (`traineval report {folder}` ranks them), or train its "
            "best_config.yaml"
        )


def check_cv_folder(run_dir: Path, split: str, verb: str = "evaluate") -> None:
    """A fold trained on part of the train and validation rows: only the test split scores
    it fairly. The cross-validation folder itself holds no model of its own (`verb`: what
    to do with one of its folds instead)."""
    if is_fold(run_dir) and split != "test":
        base = run_dir.resolve().parent
        raise ValueError(
            f"split={split!r} is invalid for {run_dir}, a fold of the cross-validation in "
            f"{base}: it trained on part of the train and validation rows, so only the test "
            f"split scores it fairly (its own validation fold is scored in "
            f"{base / CV_SUMMARY}); use --split test, the default"
        )
    if is_cross_validation(run_dir) and (
        folds := sorted(p.name for p in run_dir.glob("fold-*") if p.is_dir())
    ):
        raise ValueError(
            f"{run_dir} is a cross-validation: it has no model of its own; {verb} one of "
            f"its folds ({run_dir / folds[0]} .. {folds[-1]}); their test scores and their "
            f"ensemble's are in {run_dir / 'evaluation' / 'cv.json'}"
        )


def _evaluate_run(
    config: RunConfig,
    run_dir: Path,
    checkpoint: str,
    split: str,
    save_predictions: bool,
    plot_metrics: bool,
) -> tuple[dict[str, float], str]:
    evaluation = dataclasses.replace(
        config.evaluation,
        save_predictions=save_predictions or config.evaluation.save_predictions,
        plot_metrics=plot_metrics or config.evaluation.plot_metrics,
    )
    config = dataclasses.replace(config, evaluation=evaluation)
    choices = {
        "train": EvaluationMode.TRAINING,
        "val": EvaluationMode.VALIDATION,
        "test": EvaluationMode.TESTING,
    }
    if split not in choices:
        raise ValueError(f"split={split!r} is invalid: expected 'train', 'val' or 'test'")
    if split != "test" and not config.mode.uses_data:
        raise ValueError(
            f"split={split!r} is invalid for mode: {config.mode.name}: it makes its own data "
            "and is evaluated on fresh test episodes (split='test', the default)"
        )
    check_cv_folder(run_dir, split)
    path = run_checkpoint(run_dir, checkpoint)
    parts = run_parts(config)
    _refuse_a_changed_table(run_dir, config, parts.splits)
    dataset = getattr(parts.splits, split)
    if dataset is None:
        raise ValueError(f"the run's data has no {split} split (its fraction is 0)")
    model = parts.new_model()
    device = TrainingManager(config.training).device
    load_model_weights(model, path, map_location=device)
    hidden = parts.mode.hidden_label
    if split == "train" and hidden is not None:  # rows whose label training did not see
        logger.info("the train split's unlabeled rows (target %d) are not scored", hidden)
        evaluation = dataclasses.replace(evaluation, ignore_index=hidden)
    evaluator = Evaluator(evaluation)
    report = _evaluate_split(parts, evaluator, model, run_dir, device, choices[split])
    _log_evaluation(run_dir, choices[split], report.metrics, path.name)
    out = run_dir / "evaluation" / f"metrics_{split}.json"
    atomic_write_json(
        out,
        {
            "checkpoint": str(path),
            "split": split,
            "metrics": report.metrics,
            "per_class": report.per_class,
            "intervals": report.intervals_record(evaluation),
            "files": report.files,
        },
    )
    return report.metrics, str(out)


def run_cross_validation(config: RunConfig, folds: int, resume: bool = False) -> dict[str, Any]:
    """k-fold CV over the train + val rows; the folds' best checkpoints as an ensemble on test.

    Returns the CV summary with `test_ensemble` (the ensemble's test metrics) and
    `test_members` (each fold model's), also written to `<output_dir>/evaluation/cv.json`.
    `resume`: continue the stopped cross-validation in training.output_dir (with the same
    data, model, mode and evaluation sections, which its cv_plan.json records).
    """
    if config.mode.fold_refusal is not None or not config.mode.uses_data:
        reason = config.mode.fold_refusal or "it makes its own data, not rows to fold"
        raise ValueError(
            f"mode={config.mode.name!r} is invalid for cross-validation ({reason}): use fit"
        )
    parts = run_parts(config)
    splits = parts.splits
    pool = splits.train if splits.val is None else _concat(splits.train, splits.val)
    evaluator = Evaluator(config.evaluation)
    with watching_signals():  # a signal after the folds stops before cv.json, said in a line
        request = Folds(
            evaluator=evaluator, model_factory=parts.new_model, dataset=pool,
            config=config.training, task_type=parts.task_type, loss_function=None,
            mode=parts.mode, num_workers=config.data.num_workers, resume=resume,
            recorded=_sections_a_resume_keeps(config),
        )  # fmt: skip
        summary = cross_validate(request, folds, None, None)
        _test_the_folds(config, parts, evaluator, summary)
        stop_if_signalled(None, "the folds' test evaluation")
    out = Path(summary["output_dir"])
    (out / "evaluation").mkdir(parents=True, exist_ok=True)
    if config.data.name != "custom" and splits.feature_names is not None:
        atomic_write_json(out / DATA_SCHEMA, splits.schema())  # what a fold's predict applies
    if code_references(config.to_dict(), ("data", "model", "mode", "evaluation")):
        atomic_write_json(out / CODE_PATHS, {"search_paths": list(imports.SEARCH_PATHS)})
    write_run_config(config.to_dict(), out)
    atomic_write_json(out / "evaluation" / "cv.json", summary)  # last: the folds evaluate
    return summary


def _sections_a_resume_keeps(config: RunConfig) -> dict[str, Any]:
    """The config's data, model, mode and evaluation sections, but for how the data is read
    (data.num_workers, data.path: the plan keeps a digest of the values) and what is
    written (`EVALUATION_OUTPUTS`)."""
    written = config.to_dict()
    sections = {name: dict(written.get(name) or {}) for name in ("data", "model", "mode")}
    sections["data"].pop("num_workers", None)
    sections["data"].pop("path", None)  # a moved table: the plan's digest holds its values
    evaluation = dict(written.get("evaluation") or {})
    for name in EVALUATION_OUTPUTS:  # what is written, not what the folds are scored on
        evaluation.pop(name, None)
    return {**sections, "evaluation": evaluation}


# The evaluation fields that say what is written or how sure a final score is, never what a
# fold's validation measures: a resumed cross-validation may change them.
EVALUATION_OUTPUTS = (
    "output_dir", "plot_metrics", "save_predictions", "bootstrap_samples", "bootstrap_seed",
    "confidence_level",
)  # fmt: skip


def _test_the_folds(
    config: RunConfig, parts: RunParts, evaluator: Evaluator, summary: dict[str, Any]
) -> None:
    """The folds' best checkpoints, alone and as an ensemble, on the test split (into
    `summary`: `test_ensemble`, `test_members`)."""
    splits, out = parts.splits, Path(summary["output_dir"])
    test_loader = parts.loader(splits.test)
    if test_loader is not None:
        device = TrainingManager(config.training).device
        together = evaluator.evaluate_ensemble(
            summary["fold_checkpoints"],
            test_loader,
            device,
            model_factory=parts.new_model,
            task_type=parts.task_type,
            output_dir=out,
            training_mode=parts.mode.evaluated_as,  # scored as fit scores its test split
            class_names=splits.class_names,
            row_ids=splits.ids_of("test"),  # the predictions join back to the table
        )
        summary["test_ensemble"] = together["ensemble"]
        summary["test_members"] = together["members"]


def _concat(first: TensorDataset, second: TensorDataset) -> TensorDataset:
    return TensorDataset(
        *(torch.cat([a, b]) for a, b in zip(first.tensors, second.tensors, strict=True))
    )
