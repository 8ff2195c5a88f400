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
from .experiment import RunConfig, run_parts


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
    with untrusted(str(run_dir / "config.yaml"), trust_code=trust_code):
        path = run_checkpoint(run_dir, checkpoint or default_checkpoint(run_dir))
        model = run_parts(config).new_model()
    load_model_weights(model, path, map_location="cpu")
    return model.to(device).eval()
