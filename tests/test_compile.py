"""torch.compile through the config (slow: inductor compiles C++ on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.checkpoint import load_checkpoint_file

from conftest import make_classification, make_mlp


class Net(torch.nn.Module):
    """A plain Module, not a Sequential: a compiled Sequential defines __len__, this does not."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_weights(quiet_config, tmp_path):
    data = make_classification(n=64)
    results = {}
    for flag in (False, True):
        quiet_config["output_dir"] = str(tmp_path / f"compile-{flag}")
        config = TrainingConfig(num_epochs=2, batch_size=16, compile=flag, **quiet_config)
        model = Net()
        TrainingManager(config).train(model, DataLoader(data, 16))
        results[flag] = model
        saved = load_checkpoint_file(tmp_path / f"compile-{flag}" / "checkpoints" / "last.pt")
        assert not any(key.startswith("_orig_mod") for key in saved["model"])
    for a, b in zip(results[False].parameters(), results[True].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
