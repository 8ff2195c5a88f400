"""The training loop against hand-written PyTorch loops: same seed, same data order, fp32."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager

from conftest import make_classification, make_mlp


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs by {(pa - pb).abs().max():.3g}"


def test_sgd_loop_equals_hand_written_loop(quiet_config):
    dataset = make_classification(n=100)
    model = make_mlp()
    reference = copy.deepcopy(model)
    config = TrainingConfig(
        num_epochs=3,
        batch_size=16,
        learning_rate=0.05,
        optimizer_type="sgd",
        weight_decay=0.0,
        gradient_clipping=False,
        seed=7,
        **quiet_config,
    )
    TrainingManager(config).train(model, DataLoader(dataset, batch_size=16, shuffle=True))

    torch.manual_seed(7)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, fused=True)
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    for _ in range(3):
        for x, y in loader:
            loss = nn.functional.cross_entropy(reference(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    _assert_same_weights(model, reference)


def test_adamw_clipping_warmup_cosine_equal_hand_written_loop(quiet_config):
    """Decay on matrices only, clipping, linear warmup then cosine, all written out by hand."""
    dataset = make_classification(n=96)
    model = make_mlp()
    reference = copy.deepcopy(model)
    epochs, batch, lr, warmup, wd = 4, 16, 1e-2, 5, 0.05
    quiet_config.update(scheduler_type="cosine", warmup_steps=warmup)
    config = TrainingConfig(
        num_epochs=epochs,
        batch_size=batch,
        learning_rate=lr,
        weight_decay=wd,
        max_grad_norm=0.5,
        seed=3,
        **quiet_config,
    )
    result = TrainingManager(config).train(model, DataLoader(dataset, batch, shuffle=True))

    torch.manual_seed(3)
    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True,
    )
    total = epochs * math.ceil(len(dataset) / batch)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            nn.functional.cross_entropy(reference(x), y).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    _assert_same_weights(model, reference)
    assert result["global_step"] == total


def test_evaluation_leaves_the_training_random_streams_alone(quiet_config):
    """Iterating a DataLoader draws a seed from torch's generator, shuffled or not: without
    care, adding validation (or changing eval_frequency) would change the next epoch's
    shuffle and dropout masks."""
    dataset, val = make_classification(n=100), make_classification(n=30, seed=5)
    weights = []
    for val_loader, every in ((None, 500), (DataLoader(val, batch_size=8), 2)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
        config = TrainingConfig(
            num_epochs=3,
            batch_size=16,
            eval_frequency=every,
            seed=7,
            **{**quiet_config, "overwrite_output_dir": True},
        )
        loader = DataLoader(dataset, batch_size=16, shuffle=True)
        TrainingManager(config).train(model, loader, val_loader)
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
