"""The step types every mode builds on; they live in `traineval.training.steps`, below the loop and
the modes (the loop imports nothing from `modes/`). Re-exported here for the modes."""

from ..training.steps import (  # noqa: F401
    TARGET_KEYS,
    LossFunction,
    StepFunction,
    StepOutput,
    Updates,
    batch_size_of,
    checked_loss,
    compiled_loss,
    count_required_args,
    forward,
    loss_weight,
    loss_with_gradient,
    move_to_device,
    split_batch,
)
