"""Semi-supervised mode: labeled and unlabeled samples in one batch; three algorithms.

`algorithm="pseudo_label"` (the default; `traineval.modes.pseudo_label`, whose docstring
gives its loss); `"fixmatch"` and `"mean_teacher"` (`traineval.modes.consistency`) add a
weak / strong augmentation pair: a built-in one (`augmentation="image"` or `"tabular"`,
`traineval.data.augment`) or your own functions on a batch (`weak_augmentation`,
`strong_augmentation`: callables, or import paths in config files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..config.checks import Custom, Int, Number, OneOf, choice, fail
from ..config.code_references import import_object
from ..config.training_config import setting
from ..data.splits import DataSplits, dataset_labels, hide_labels
from .consistency import FixMatchStep, MeanTeacherStep
from .contract import Context, Mode, ModePlan, register
from .pseudo_label import SemiSupervisedStep

__all__ = ["SemiSupervised", "SemiSupervisedStep"]

ALGORITHMS = ("pseudo_label", "fixmatch", "mean_teacher")


def _negative(field: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value >= 0:
        fail(field, value, "expected a negative integer (class ids are >= 0)")
    return value


def _image_shape(field: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        fail(field, value, "expected (channels, height, width)")
    return tuple(int(size) for size in value)


@register
@dataclasses.dataclass(frozen=True)
class SemiSupervised(Mode):
    """Classification batches where targets equal to `unlabeled_label` mark unlabeled
    samples (`traineval.modes.semi_supervised`).

    Settings: `unlabeled_label` (a negative integer), `unlabeled_weight` (the unlabeled
    term's weight), `pseudo_label_threshold` (the top probability a pseudo-label needs;
    pseudo_label and fixmatch), `algorithm` ("pseudo_label", "fixmatch", "mean_teacher"),
    `augmentation` ("image", "tabular": a built-in weak / strong pair), `weak_augmentation`
    and `strong_augmentation` (your own: a callable on a batch, or an import path),
    `image_shape` ((C, H, W) of flat image inputs, for `augmentation="image"`),
    `rampup_steps` (mean_teacher: updates over which the consistency weight ramps up).
    Mean Teacher's teacher is the run's moving average of the weights (`ema_decay`).
    """

    name: ClassVar[str] = "semi_supervised"
    unlabeled_label: int = setting(-1, Custom(_negative, "negative integer"))
    unlabeled_weight: float = setting(1.0, Number(0.0))
    pseudo_label_threshold: float = setting(0.95, Number(0.0, at_most=1.0))
    algorithm: str = setting("pseudo_label", OneOf(ALGORITHMS))
    augmentation: str | None = None
    weak_augmentation: Any = None
    strong_augmentation: Any = None
    image_shape: tuple[int, ...] | None = setting(None, Custom(_image_shape, "(C, H, W) or null"))
    rampup_steps: int = setting(0, Int(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.augmentations()  # names and import paths resolve now, not mid-run

    def augmentations(self) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
        """The (weak, strong) augmentations these settings name (None where none)."""
        weak = strong = None
        if self.augmentation is not None:
            from ..data.augment import augmentation_pair

            choice(self.key("augmentation"), self.augmentation, ("image", "tabular"))

            weak, strong = augmentation_pair(self.augmentation, self.image_shape)
        weak = self._function("weak_augmentation") or weak
        strong = self._function("strong_augmentation") or strong
        needs = {"fixmatch": (weak, strong), "mean_teacher": (weak,)}.get(self.algorithm, ())
        if any(f is None for f in needs):
            fail(
                self.key("augmentation"),
                self.augmentation,
                f"algorithm={self.algorithm!r} needs a weak"
                + (" and a strong" if self.algorithm == "fixmatch" else "")
                + " augmentation: augmentation='image' or 'tabular', or weak_augmentation"
                + (" / strong_augmentation" if self.algorithm == "fixmatch" else ""),
            )
        if self.algorithm == "pseudo_label" and (weak or strong):
            fail(
                self.key("algorithm"),
                self.algorithm,
                "augmentations apply to 'fixmatch' and 'mean_teacher' (pseudo_label trains "
                "on the inputs as given)",
            )
        return weak, strong

    def _function(self, setting: str) -> Callable[..., Any] | None:
        value = getattr(self, setting)
        if value is None or callable(value):
            return value
        if isinstance(value, str):
            found = import_object(value, field=self.key(setting))
            if callable(found):
                return found
        fail(self.key(setting), value, "expected a function on a batch or an import path")

    def settings(self) -> dict[str, Any]:
        """As `Mode.settings`, with your augmentation functions by import path."""
        out = super().settings()
        for key in ("weak_augmentation", "strong_augmentation"):
            value = out[key]
            if callable(value):  # a function or class by import path, an object by repr
                name = getattr(value, "__qualname__", None) or repr(value)
                out[key] = f"{getattr(value, '__module__', '?')}:{name}"
        return out

    @property
    def hidden_label(self) -> int:
        return self.unlabeled_label

    def prepare(self, splits: DataSplits, data: Any) -> DataSplits:
        """`data.labeled_fraction` of the train labels kept, the other rows kept unlabeled
        (their target `unlabeled_label`)."""
        if data.labeled_fraction < 1.0:
            splits.train = hide_labels(
                splits.train, data.labeled_fraction, self.unlabeled_label, data.split_seed
            )
        return splits

    def fold(self, dataset: Any, folds: list[Any]) -> list[Any]:
        """A fold's unlabeled rows train with the other folds (validation needs labels)."""
        unlabeled = dataset_labels(dataset) == self.unlabeled_label
        return [
            (np.sort(np.concatenate([train, val[unlabeled[val]]])), val[~unlabeled[val]])
            for train, val in folds
        ]

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.user_loss:
            raise ValueError(
                "loss_function is not used in mode='semi_supervised': it trains with "
                "cross-entropy on the labeled samples plus the unlabeled term; leave "
                "loss_function None"
            )
        if self.algorithm == "mean_teacher" and not ctx.config.ema_decay:
            raise ValueError(
                "mode.algorithm='mean_teacher' takes its teacher from the moving average of "
                "the weights: set training.ema_decay (e.g. 0.99)"
            )
        uses_fsdp = ctx.config.distributed_strategy == "fsdp"
        if self.algorithm == "mean_teacher" and ctx.job.enabled and uses_fsdp:
            raise ValueError(
                "distributed_strategy='fsdp' is not supported with algorithm='mean_teacher': "
                "its teacher is called with the whole averaged weights, which FSDP keeps in "
                "shards; use distributed_strategy='ddp'"
            )

    def plan(self, ctx: Context) -> ModePlan:
        weak, strong = self.augmentations()
        transform = ctx.output_transform
        label, weight = self.unlabeled_label, self.unlabeled_weight
        step: SemiSupervisedStep
        if self.algorithm == "fixmatch":
            assert weak is not None
            assert strong is not None
            step = FixMatchStep(
                weak, strong, label, weight, self.pseudo_label_threshold, output_transform=transform
            )
        elif self.algorithm == "mean_teacher":
            assert weak is not None
            step = MeanTeacherStep(
                weak, label, weight, self.rampup_steps, output_transform=transform
            )
        else:
            step = SemiSupervisedStep(
                label, weight, self.pseudo_label_threshold, output_transform=transform
            )
        return ModePlan(step)
