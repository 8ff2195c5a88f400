"""Semi-supervised mode: labeled and unlabeled samples in one batch; three algorithms.

`algorithm="pseudo_label"` (the default; `traineval.modes.pseudo_label`, whose docstring
gives its loss); `"fixmatch"` and `"mean_teacher"` (`traineval.modes.consistency`) add a
weak / strong augmentation pair: a built-in one (`augmentation="image"` or `"tabular"`,
`traineval.augment`) or your own functions on a batch (`weak_augmentation`,
`strong_augmentation`: callables, or import paths in config files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..checks import choice, fail, integer, number
from ..data.splits import DataSplits, dataset_labels, hide_labels
from ..imports import import_object
from .consistency import FixMatchStep, MeanTeacherStep
from .contract import Context, Mode, ModePlan, register
from .pseudo_label import SemiSupervisedStep

__all__ = ["SemiSupervised", "SemiSupervisedStep"]

ALGORITHMS = ("pseudo_label", "fixmatch", "mean_teacher")


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
    unlabeled_label: int = -1
    unlabeled_weight: float = 1.0
    pseudo_label_threshold: float = 0.95
    algorithm: str = "pseudo_label"
    augmentation: str | None = None
    weak_augmentation: Any = None
    strong_augmentation: Any = None
    image_shape: tuple[int, ...] | None = None
    rampup_steps: int = 0

    def __post_init__(self) -> None:
        label = self.unlabeled_label
        if isinstance(label, bool) or not isinstance(label, int) or label >= 0:
            fail(
                self.key("unlabeled_label"),
                self.unlabeled_label,
                "expected a negative integer (class ids are >= 0)",
            )
        number(self.key("unlabeled_weight"), self.unlabeled_weight, minimum=0.0)
        number(self.key("pseudo_label_threshold"), self.pseudo_label_threshold, minimum=0.0)
        if self.pseudo_label_threshold > 1.0:
            fail(
                self.key("pseudo_label_threshold"),
                self.pseudo_label_threshold,
                "expected a number in [0, 1]",
            )
        choice(self.key("algorithm"), self.algorithm, ALGORITHMS)
        integer(self.key("rampup_steps"), self.rampup_steps, minimum=0)
        if self.image_shape is not None:
            shape = self.image_shape
            if not isinstance(shape, (list, tuple)) or len(shape) != 3:
                fail(self.key("image_shape"), shape, "expected (channels, height, width)")
            object.__setattr__(self, "image_shape", tuple(int(size) for size in shape))
        self.augmentations()  # names and import paths resolve now, not mid-run

    def augmentations(self) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
        """The (weak, strong) augmentations these settings name (None where none)."""
        weak = strong = None
        if self.augmentation is not None:
            from ..augment import augmentation_pair

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
        for setting in ("weak_augmentation", "strong_augmentation"):
            value = out[setting]
            if callable(value):  # a function or class by import path, an object by repr
                name = getattr(value, "__qualname__", None) or repr(value)
                out[setting] = f"{getattr(value, '__module__', '?')}:{name}"
        return out

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
                "algorithm='mean_teacher' takes its teacher from the moving average of the "
                "weights: set ema_decay (e.g. 0.99)"
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
