"""torch.compile through the config (slow: inductor compiles C++ on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.runs.checkpoint import load_checkpoint_file

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


class TinyLM(torch.nn.Module):
    """(N, T) token ids -> (N, T, V) logits: AutoLoss picks the token cross-entropy."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.slow
def test_compiled_token_loss_matches_eager_with_ignored_tokens(quiet_config, tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (24, 6), generator=generator)
    targets = tokens.roll(-1, dims=1)
    targets[::3, 4:] = -100  # padding: the loss and the window's weights skip these
    data = torch.utils.data.TensorDataset(tokens, targets)
    models = {}
    for flag in (False, True):
        quiet_config["output_dir"] = str(tmp_path / f"lm-{flag}")
        config = TrainingConfig(
            num_epochs=2, batch_size=4, gradient_accumulation_steps=2, compile=flag, **quiet_config
        )
        models[flag] = TinyLM()
        TrainingManager(config).train(models[flag], DataLoader(data, 4))
    for a, b in zip(models[False].parameters(), models[True].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_compile_compiles_the_model_and_the_loss_in_the_configured_mode(quiet_config, monkeypatch):
    compiled: list[tuple[object, str]] = []

    def fake_compile(target, mode="default", **_):
        compiled.append((target, mode))
        return target

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = TrainingConfig(
        num_epochs=1,
        batch_size=16,
        compile=True,
        compile_mode="max-autotune-no-cudagraphs",
        **quiet_config,
    )
    model = Net()
    TrainingManager(config).train(model, DataLoader(make_classification(n=32), 16))
    kinds = [type(target).__name__ for target, _ in compiled]
    assert kinds == ["Net", "ClassCrossEntropy"]  # the AutoLoss compiles what it resolved to
    assert {mode for _, mode in compiled} == {"max-autotune-no-cudagraphs"}


def test_compile_takes_a_loss_of_your_own(quiet_config, monkeypatch, tmp_path):
    """compile=True with a concrete loss (every config-file run's, and yours) failed at the
    first step: 'ClassCrossEntropy' object has no attribute 'task_type'."""
    from traineval.cli import main

    monkeypatch.setattr(torch, "compile", lambda target, mode="default", **_: target)
    config = TrainingConfig(num_epochs=1, batch_size=16, compile=True, **quiet_config)
    result = TrainingManager(config).train(
        Net(), DataLoader(make_classification(n=32), 16), loss_function=torch.nn.CrossEntropyLoss()
    )
    assert result.global_step == 2
    run = tmp_path / "fit"
    argv = ["demo", "-q", "training.num_epochs=1", "training.compile=true"]
    assert main([*argv, f"training.output_dir={run}"]) == 0
    assert (run / "checkpoints" / "best.pt").exists()
