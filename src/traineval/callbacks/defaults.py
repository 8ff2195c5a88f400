"""The callbacks every `TrainingManager.train` run has, before the user's: built from the
config by the manager, so the loop and the callbacks themselves read no config."""

from __future__ import annotations

from ..config.training_config import TrainingConfig
from .base import Callback
from .checkpointing import BestWeights, ModelCheckpoint
from .early_stopping import EarlyStopping
from .progress import EpochSummary, ProgressBar
from .stop_when import StopWhen

LINE_SECONDS = 30.0  # without a progress bar: a progress line inside an epoch at most this often


def default_callbacks(config: TrainingConfig, is_main: bool) -> list[Callback]:
    """Progress (a bar on a terminal, else a line every `LINE_SECONDS`; rank 0 only), early
    stopping, `stop_when`, checkpoints and the best weights, as `config` asks."""
    c = config
    bar = ProgressBar(c.progress_bar if is_main else False)
    callbacks: list[Callback] = [bar]
    if is_main and c.verbose:
        callbacks.append(EpochSummary(every_seconds=None if bar.enabled else LINE_SECONDS))
    if c.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(c.early_stopping_patience))
    if c.stop_when:
        callbacks.append(StopWhen(c.stop_when))
    callbacks.append(
        ModelCheckpoint(
            save_best=c.save_best_model,
            save_last=c.save_last_checkpoint,
            every_n_epochs=c.checkpoint_save_frequency,
            every_n_steps=c.checkpoint_every_n_steps,
        )
    )
    if c.restore_best_weights:
        callbacks.append(BestWeights(keep_shards=c.checkpoint_sharding != "full"))
    return callbacks
