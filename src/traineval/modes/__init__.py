"""Training modes as step functions: `(model, batch) -> StepOutput`; the loop owns the update.

Every mode runs through the same loop. Supervised, unsupervised, semi-supervised and
meta-learning steps take batches of the user's loader; federated and reinforcement steps
take the items of a loader the mode provides (rounds, policy updates): `setup.prepare_mode`
builds those and refuses what a mode does not support.
"""

from __future__ import annotations

from ..batches import ModelLoss, OutputTransform
from ..config import TrainingConfig, TrainingMode
from .base import LossFunction, StepFunction, StepOutput, move_to_device, split_batch
from .meta_learning import MetaLearningStep
from .semi_supervised import SemiSupervisedStep
from .supervised import SupervisedStep
from .unsupervised import UnsupervisedStep

__all__ = [
    "MetaLearningStep",
    "SemiSupervisedStep",
    "StepFunction",
    "StepOutput",
    "SupervisedStep",
    "UnsupervisedStep",
    "build_step",
    "move_to_device",
    "split_batch",
]


def build_step(
    mode: TrainingMode,
    loss_function: LossFunction,
    config: TrainingConfig | None = None,
    *,
    output_transform: OutputTransform | None = None,
    model_loss: ModelLoss | None = None,
    label_shift: int = 0,
) -> StepFunction:
    """The step function of a training mode.

    From `config`: `compile` (the loss function through torch.compile, in `compile_mode`)
    the semi-supervised settings (`unlabeled_label`, `unlabeled_weight`,
    `pseudo_label_threshold`) and the meta-learning ones (`meta_algorithm`, `meta_inner_lr`,
    `meta_inner_steps`). `output_transform` reads the prediction from the model's output, and
    `model_loss` trains supervised batches that carry `labels` on the model's own loss, and
    `label_shift` scores a causal LM's logits at t against the label at t + 1 under
    traineval's token loss (see `traineval.batches`).

    Raises:
        ValueError: federated and reinforcement modes (built by `setup.prepare_mode`).
    """
    c = config or TrainingConfig()
    compile_mode = c.compile_mode if c.compile else None
    if mode is TrainingMode.SUPERVISED:
        return SupervisedStep(
            loss_function,
            compile_mode,
            output_transform=output_transform,
            model_loss=model_loss,
            label_shift=label_shift,
        )
    if mode is TrainingMode.UNSUPERVISED:
        return UnsupervisedStep(loss_function, compile_mode, output_transform=output_transform)
    if mode is TrainingMode.SEMI_SUPERVISED:
        return SemiSupervisedStep(
            c.unlabeled_label,
            c.unlabeled_weight,
            c.pseudo_label_threshold,
            output_transform=output_transform,
        )
    if mode is TrainingMode.META_LEARNING:
        return MetaLearningStep.from_config(c, loss_function, output_transform)
    # FEDERATED and REINFORCEMENT: their steps need the clients / the environment
    raise ValueError(
        f"mode={mode.value!r} has no step function of its own: TrainingManager.train builds "
        "it (modes.setup.prepare_mode) from the clients' loaders or the environment"
    )
