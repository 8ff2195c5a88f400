"""The Mode contract: what a training mode owns, and the plan it gives the run's assembly.

A mode is a frozen dataclass whose fields are its settings (checked on construction, beside
the code that reads them). The run's assembly (`traineval.assembly.build`) asks it twice:

    mode.check(ctx)     refuse what the mode cannot combine with, before any work
    mode.plan(ctx)      -> ModePlan: the step function, what the loop iterates, whether the
                        model is wrapped for DDP, the optimizer, clipping, validation, the
                        default monitor and the seed policy

Everything else (precision, accumulation, checkpoints and exact resume, DDP, loggers,
callbacks, early stopping) is the loop's and works for every mode alike, a user's own
included. Register a mode under its `name` with `traineval.modes.register` to use the name
in config files and `train(mode="...")`; an instance trains without registering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..config import registry
from ..config.checks import fail
from ..config.code_references import check_trusted, import_object
from ..config.training_config import TaskType, TrainingConfig, TrainingMode, check_fields
from ..data.splits import DataSplits, hide_labels, labeled_rows
from ..system.distributed import Distributed
from ..training.batches import ModelLoss, OutputTransform
from ..training.precision import Precision

__all__ = [
    "Context",
    "Mode",
    "ModePlan",
    "MonitorChoice",
    "closing_step",
    "register",
    "resource",
]

M = TypeVar("M", bound=type)


RESOURCE = "traineval_resource"


def resource(*, default: Any = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A Mode field for an object the mode uses but does not record: a teacher model, an
    environment factory, a tokenizer. Pass it to the constructor
    (`Distill(teacher=trained)`), or give `default_factory` to build it where a config
    file names the mode. A resource is not a setting: it is never written to a checkpoint
    or config.yaml (nothing is pickled), never compared on resume, and not accepted from a
    config file; give it again when you resume from Python."""
    metadata = {RESOURCE: True}
    if default_factory is not None:
        return dataclasses.field(
            default_factory=default_factory, compare=False, repr=False, metadata=metadata
        )
    return dataclasses.field(default=default, compare=False, repr=False, metadata=metadata)


def setting_fields(mode: Any) -> list[dataclasses.Field[Any]]:
    """A mode's (class's or instance's) setting fields: every field but its resources."""
    return [f for f in dataclasses.fields(mode) if not f.metadata.get(RESOURCE)]


@contextlib.contextmanager
def closing_step(step: Any) -> Iterator[None]:
    """Run with `step`; then call its `close()`, where it has one, however the run ends."""
    try:
        yield
    finally:
        close = getattr(step, "close", None)
        if callable(close):
            close()


@dataclasses.dataclass(frozen=True)
class MonitorChoice:
    """The metric a mode monitors by default (early stopping, best checkpoint, plateau)."""

    name: str
    minimize: bool


@dataclasses.dataclass
class Context:
    """What a mode plans with: the run's config, data, loss and placement."""

    config: TrainingConfig
    train_data: Any  # train()'s train_loader argument, as given
    val_loader: Any  # the whole validation loader (every rank's, under torchrun)
    loss_function: Any  # the user's, or the task's default
    user_loss: bool  # whether the user passed `loss_function`
    model_loss: ModelLoss | None  # the model computes its own loss from `labels`
    output_transform: OutputTransform | None
    label_shift: int  # a causal LM's one-token shift under traineval's token loss
    job: Distributed
    device: torch.device
    precision: Precision

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for the loss function, None when compile is off."""
        return self.config.compile_mode if self.config.compile else None


Evaluate = Callable[[nn.Module], Mapping[str, float]]
BuildOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


@dataclasses.dataclass
class ModePlan:
    """A mode's part of a run.

    Attributes:
        step: the step function `(model, batch) -> StepOutput` with `weight(batch)`; a
            step that holds resources (worker processes, files) may define `close()`,
            which traineval calls when the run ends, also when it fails.
        loader: what the loop iterates; None: the user's train loader (sharded under
            torchrun). Modes that make their own data iterate `Updates(n)`.
        wraps_model: False where the step cannot run through a DDP wrapper (several
            forward passes per update, functional calls); the loop then averages the
            gradients over the ranks itself.
        clips_gradients: whether the loop clips (`gradient_clipping`, `max_grad_norm`).
        optimizer: `(model, default) -> optimizer`, where `default(model)` builds the
            configured one; None: the configured one.
        evaluate: `model -> metrics` (logged as val_<name>); None: the Evaluator scores
            the val_loader. It runs under the run's precision with the model in eval mode;
            under torchrun every rank calls it with the unwrapped model, so scoring the
            whole `ctx.val_loader` gives every rank the same metrics (to split the work,
            shard it with `traineval.data.sharding.shard_eval_loader` and sum over `ctx.job`).
        monitor: the default monitor when the config keeps `monitor_metric`'s default.
        shared_seed: whether the ranks share one random stream (rounds, policy updates).
        extra_metrics: `model -> metrics` added to each validation's (e.g. a linear probe
            of the codes), under the same precision and eval mode.
        extra_metric_names: the names `extra_metrics` returns (`monitor_metric` may name
            them, as `val_<name>`).
        record: what the mode made of the data, as plain JSON values (the federated
            partition: each client's samples and labels), written to the run directory
            as `mode.json` when the run starts; empty: no file.
    """

    step: Any
    loader: Any = None
    wraps_model: bool = True
    clips_gradients: bool = True
    optimizer: Callable[[nn.Module, BuildOptimizer], torch.optim.Optimizer] | None = None
    evaluate: Evaluate | None = None
    monitor: MonitorChoice | None = None
    shared_seed: bool = False
    extra_metrics: Evaluate | None = None
    extra_metric_names: tuple[str, ...] = ()
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Mode:
    """Base of the training modes; subclass it (as a frozen dataclass) for your own.

    Class attributes say what the mode supports; the generic refusals in `check` read them:

        name               the registry's and config files' key
        supervised_loss    label_smoothing, class_weights and the model's own loss apply
        reconstructs       the model's outputs are compared with its inputs (MSE by
                           default, regression metrics)
        compile_refusal    why compile=True is refused (None: allowed)
        accumulation_refusal  what to do instead of gradient_accumulation_steps > 1
                           (None: allowed)
        shards             whether FSDP may shard the model
        resume_fixed       settings a resume must not change (they change the data drawn)
    """

    name: ClassVar[str] = ""
    supervised_loss: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False
    compile_refusal: ClassVar[str | None] = None
    accumulation_refusal: ClassVar[str | None] = None
    shards: ClassVar[bool] = True
    resume_fixed: ClassVar[tuple[str, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()  # other names its settings and records go by

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A setting may not take a name the contract uses (`saved`, `settings`, `check`,
        `name`, ...): the run would call or read the setting's value instead. Refused where
        the class is defined (it trained, then failed to resume with a bare TypeError)."""
        super().__init_subclass__(**kwargs)
        for field, annotation in inspect.get_annotations(cls).items():
            if field.startswith("_") or "ClassVar" in str(annotation):
                continue
            if hasattr(Mode, field):
                raise TypeError(
                    f"{cls.__name__}.{field}: a mode's setting cannot be named {field!r}, "
                    f"which the Mode contract uses (Mode.{field}); rename the setting"
                )

    def __post_init__(self) -> None:
        """Check each setting declared with `setting(default, Rule)` (errors name it as
        `<mode>.<setting>`); a mode with checks of its own calls `super().__post_init__()`."""
        check_fields(self, prefix=f"{self.name}.")

    def check(self, ctx: Context) -> None:
        """Refuse combinations the mode does not support; override to add your own (call
        `super().check(ctx)`)."""
        c, name = ctx.config, self.name
        _refuse_environment_sources(self, ctx.train_data)
        if ctx.job.enabled and c.distributed_strategy == "fsdp" and not self.shards:
            raise ValueError(
                f"distributed_strategy='fsdp' is not supported in mode='{name}' (it reads and "
                "averages whole weights); use distributed_strategy='ddp'"
            )
        if c.compile and self.compile_refusal is not None:
            raise ValueError(
                f"compile=True is not supported in mode='{name}': {self.compile_refusal}; "
                "leave it off"
            )
        if c.gradient_accumulation_steps > 1 and self.accumulation_refusal is not None:
            raise ValueError(
                f"gradient_accumulation_steps={c.gradient_accumulation_steps} is invalid in "
                f"mode='{name}': {self.accumulation_refusal} (expected 1)"
            )

    # -- a config-file run's data (`traineval fit`, `cv`, `tune`) --------------------------

    own_metrics: ClassVar[bool] = False  # validation metrics are the mode's, not the task's
    fold_refusal: ClassVar[str | None] = None  # why cross-validation does not apply
    uses_data: ClassVar[bool] = True  # False: `prepare` makes its data (an environment)

    @property
    def hidden_label(self) -> int | None:
        """The target that marks a training row whose label the mode hides (`prepare`), so
        scoring the training split leaves those rows out; None: no row's label is hidden."""
        return None

    def check_config_run(self) -> None:
        """Refuse what a config-file run of this mode lacks (from Python the data is passed
        to `train`); called when the run config is built."""

    def model_options(
        self, model: str, options: dict[str, Any], splits: DataSplits
    ) -> dict[str, Any]:
        """The options the config's `model` (a built-in model's name) is built with for
        these splits; the default: as configured."""
        return options

    def prepare(self, splits: Any, data: Any) -> DataSplits:
        """The splits this mode trains on, from those the config's `data` section (`data`)
        made (None where the mode does not `uses_data`). The default keeps
        `data.labeled_fraction` of the train labels by dropping the other rows;
        semi-supervised keeps those rows unlabeled, meta-learning cuts every split into
        tasks, reinforcement makes its environment. Override to shape data your own way
        (call `super().prepare`)."""
        if data.labeled_fraction < 1.0:
            before = splits.train
            splits.train = hide_labels(before, data.labeled_fraction, -1, data.split_seed, True)
            if splits.indices is not None and splits.train is not before:  # rows left out
                kept = labeled_rows(before.tensors[1].numpy(), data.labeled_fraction,
                                    data.split_seed)  # fmt: skip
                splits.indices = {**splits.indices, "train": splits.indices["train"][kept]}
        return splits

    def task_of(self, splits: DataSplits) -> TaskType | None:
        """The task the Evaluator scores this mode's model as; None: the mode scores it
        (`score`, `ModePlan.evaluate`)."""
        return None if self.reconstructs else splits.task_type

    def fold(self, dataset: Any, folds: list[Any]) -> list[Any]:
        """Cross-validation's `(train, val)` index pairs, as this mode needs them (e.g. rows
        without labels train in every fold and validate in none)."""
        return folds

    @property
    def evaluated_as(self) -> TrainingMode:
        """How the Evaluator scores this mode's model: its outputs against its inputs
        (`reconstructs`), or against the targets."""
        return TrainingMode.UNSUPERVISED if self.reconstructs else TrainingMode.SUPERVISED

    def plan(self, ctx: Context) -> ModePlan:
        """The mode's plan for this run (see `ModePlan`)."""
        raise NotImplementedError(f"{type(self).__name__} must define plan(ctx)")

    def score(
        self, model: nn.Module, data: Any, device: torch.device, *, seed: int = 0
    ) -> Mapping[str, float] | None:
        """Test-time scoring of a trained `model` on `data` (a test loader; reinforcement:
        the environment); None: the Evaluator scores it as the task says."""
        return None

    # -- settings --------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The settings as plain values (lists for tuples); resources left out."""
        out: dict[str, Any] = {}
        for f in setting_fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict[str, Any]:
        """`{name, **settings}`: the `mode:` section of a config file (`name` as a config
        file names the mode: see `mode_reference`)."""
        return {"name": mode_reference(type(self)), **self.settings()}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Mode:
        """The mode with `settings`; an unknown key (or a resource, which only Python code
        passes) is an error naming the allowed ones."""
        allowed = [f.name for f in setting_fields(cls)]
        for key in settings:
            if key not in allowed:
                listed = ", ".join(allowed) or "none"
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                fail(
                    f"mode.{key}",
                    settings[key],
                    f"mode {cls.name!r} has the settings {listed}{hint}",
                )
            _check_plain_type(cls, key, settings[key])
        return cls(**dict(settings))

    @classmethod
    def saved(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """A recorded `settings` (a checkpoint's, a run directory's config) completed with
        the values it implies: override when a setting is added whose old behaviour is not
        its default (resume checks compare `resume_fixed` settings of these)."""
        return dict(settings)

    def key(self, setting: str) -> str:
        """How errors name a setting: `federated.clients`."""
        return f"{self.name}.{setting}"


PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_plain_type(cls: type[Mode], key: str, value: Any) -> None:
    """A setting given in a config file, against its annotation where that is `int`,
    `float`, `bool` or `str` and no `setting(default, Rule)` checks it (a string where the
    mode divides by the number failed as a bare TypeError midway)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    written = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    allowed = PLAIN_TYPES.get(written)
    if field.metadata.get("rule") is not None or allowed is None:
        return
    is_bool = isinstance(value, bool)
    if not isinstance(value, allowed) or (is_bool and written != "bool"):
        fail(f"mode.{key}", value, f"mode {cls.name!r} declares it {written}")


def refuse_resources_without_factory(cls: type[Mode]) -> None:
    """A mode named in a config file gets no resources but those with a `default_factory`:
    one without (and not declared optional, `X | None`) fails midway on None."""
    for f in dataclasses.fields(cls):
        factory = f.default_factory is not dataclasses.MISSING
        optional = "None" in str(f.type)
        if f.metadata.get(RESOURCE) and not factory and f.default is None and not optional:
            raise ValueError(
                f"mode {cls.name!r} needs its resource {f.name!r}, which a config file "
                f"cannot give: give it a default_factory (resource(default_factory=...)) "
                "or train from Python, passing it to the constructor"
            )


ENTRY_POINTS = "traineval.modes"  # the entry-point group through which packages offer modes


_OFFERED: set[type] = set()  # modes loaded through the entry-point group


def mode_reference(cls: type[Mode]) -> str:
    """How a config file names `cls`: its name for traineval's own modes and those an
    installed package offers by entry point (any process finds them by name), else its
    import path `package.module:Class`, which a later process (`evaluate`, `--resume`) can
    import under the trust rule for run directories; a mode that is only `register`ed
    would not be found by name there. A class no other process could import by its path
    (a script's, `__main__`, or code run with exec) keeps its name."""
    registered = cls.name in registry.names() and registry.lookup(cls.name) is cls
    if registered and (cls.__module__.startswith("traineval.") or cls in _OFFERED):
        return cls.name
    found: Any = sys.modules.get(cls.__module__) if cls.__module__ != "__main__" else None
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return f"{cls.__module__}:{cls.__qualname__}" if found is cls else cls.name


def mode_class(name: Any, field: str = "mode") -> type[Mode]:
    """The Mode class a config names: a registered name; an import path
    `package.module:Class` (refused inside `imports.untrusted`, as every import path read
    from a run directory); or a name a package offers in the `traineval.modes` entry-point
    group (`[project.entry-points."traineval.modes"] kd = "mypkg.kd:Distillation"`), under
    the same trust rule."""
    if isinstance(name, str) and ":" in name:
        found = import_object(name, field=field)
        if not (isinstance(found, type) and issubclass(found, Mode)):
            fail(field, name, f"expected a traineval Mode subclass, got {found!r}")
        return found
    if isinstance(name, str) and name not in registry.names():
        offered = _entry_point(name, field)
        if offered is not None:
            return offered
    registered: type[Mode] = registry.lookup(name, field=field)
    return registered


def _entry_point(name: str, field: str) -> type[Mode] | None:
    """The mode an installed package offers as `name` (registered once loaded), if any."""
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS, name=name):
        check_trusted(field, point.value)
        found = point.load()
        if not (isinstance(found, type) and issubclass(found, Mode)):
            fail(field, name, f"entry point {point.value!r} is not a traineval Mode subclass")
        if found.name != name:  # config files record the class's name: it must find it again
            fail(field, name, f"entry point {name!r} loads {point.value!r}, whose name is "
                 f"{found.name!r}: name the entry point {found.name!r}")  # fmt: skip
        registry.add(found)
        _OFFERED.add(found)
        return found
    return None


def register(cls: M | None = None, *, replace: bool = False) -> Any:
    """Register a Mode class under its `name` (a decorator): config files and
    `train(mode="...")` can then name it."""

    def add(mode_class: M) -> M:
        if not (isinstance(mode_class, type) and issubclass(mode_class, Mode)):
            raise TypeError(f"register takes a Mode subclass, got {mode_class!r}")
        registry.add(mode_class, replace=replace)
        return mode_class

    return add if cls is None else add(cls)


def _refuse_environment_sources(mode: Mode, train_data: Any) -> None:
    """A function or a string as the training data is an environment source (a factory, a
    Gymnasium id), which only modes without data read: refused in the others, before a
    string is iterated letter by letter or a function called for batches."""
    if not mode.uses_data:
        return
    kind = "a string" if isinstance(train_data, str) else None
    if kind is None and callable(train_data) and not hasattr(train_data, "__iter__"):
        kind = "a function"
    if kind is not None:
        raise ValueError(
            f"train_loader={train_data!r} is {kind}: mode='{mode.name}' trains on a DataLoader "
            "(or any iterable of batches; a table's path runs through `traineval fit` with "
            "data.path); a function or a Gymnasium id makes environments, for "
            "mode='ppo' or 'policy_gradient'"
        )
