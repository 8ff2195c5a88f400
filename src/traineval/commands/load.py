"""A trained model back in Python, from a run directory (`traineval.load_model`).

`load_model(run_dir)` rebuilds the model a config-file run trained (its `config.yaml`'s
`model` section, shaped by the run's data and mode as training shaped it) and loads a
checkpoint's weights into it: the best by default, or "last", "epoch-NNNN", "final" (a
Flower run's final weights) or a path. A run directory is untrusted input, as for
`traineval evaluate`: one whose config names code to import is refused unless
`trust_code=True`. For a model you build yourself, `traineval.load_checkpoint(path, model)`
loads the weights of any traineval checkpoint into it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config.code_references import untrusted
from ..runs.checkpoint import default_checkpoint, load_model_weights, run_checkpoint
from ..system.seeding import seed_everything
from .experiment import (
    DATA_SCHEMA,
    RunConfig,
    RunParts,
    check_cv_folder,
    recorded_in,
    run_parts,
)
from .predict import ROWLESS_MODES, table_of


def load_model(
    run_dir: str | Path,
    checkpoint: str | None = None,
    *,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> nn.Module:
    """The model of the run in `run_dir` with `checkpoint`'s weights, on `device`, in eval
    mode (see the module docstring).

    Example:
        >>> import traineval
        >>> model = traineval.load_model("runs/digits")  # doctest: +SKIP
        >>> model(inputs).argmax(dim=1)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    config = RunConfig.from_run_dir(run_dir, trust_code=trust_code)
    check_cv_folder(run_dir, "test", "load")  # a cross-validation's folder: load a fold
    with untrusted(str(run_dir / "config.yaml"), trust_code=trust_code):
        path = run_checkpoint(run_dir, checkpoint or default_checkpoint(run_dir))
        model = _parts(config, run_dir).new_model()
    load_model_weights(model, path, map_location="cpu")
    return model.to(device).eval()


def _parts(config: RunConfig, run_dir: Path) -> RunParts:
    """What builds the run's model: from the table's description the run kept (its
    data.json: the table may have moved or changed since), for a mode that scores rows;
    else from the run's data, split again."""
    mode = config.mode
    episodic = mode.name in ROWLESS_MODES and not mode.reconstructs  # its own shapes
    if not (recorded_in(run_dir) / DATA_SCHEMA).is_file() or episodic or not mode.uses_data:
        return run_parts(config)
    splits = table_of(config, run_dir)
    seed_everything(config.training.seed)
    return RunParts(config, splits, mode, mode.task_of(splits))
