"""Per-module learning rates and frozen parameters against a hand-written loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager

from conftest import make_classification


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.backbone = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(torch.relu(self.embed(x))))


def test_multipliers_and_frozen_parameters_equal_hand_written_groups(quiet_config):
    data = make_classification(n=96, seed=1)
    model = Net()
    reference = copy.deepcopy(model)
    quiet_config.update(scheduler_type="cosine", warmup_steps=3)
    config = TrainingConfig(
        num_epochs=3,
        batch_size=16,
        learning_rate=1e-2,
        weight_decay=0.1,
        gradient_clipping=False,
        seed=2,
        lr_multipliers={"backbone": 0.1, "backbone.1": 0.5},  # the longest prefix wins
        frozen_parameters=("embed",),
        **quiet_config,
    )
    result = TrainingManager(config).train(model, DataLoader(data, 16, shuffle=True))

    torch.manual_seed(2)
    for p in reference.embed.parameters():
        p.requires_grad_(False)
    groups = [
        {"params": [reference.head.weight], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [reference.head.bias], "lr": 1e-2, "weight_decay": 0.0},
        {"params": list(reference.backbone[1].parameters()), "lr": 5e-3, "weight_decay": 0.0},
        {"params": [reference.backbone[0].weight], "lr": 1e-3, "weight_decay": 0.1},
        {"params": [reference.backbone[0].bias], "lr": 1e-3, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, fused=True)
    total = 3 * 6

    def factor(t: int) -> float:
        if t < 3:
            return (t + 1) / 3
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 3) / (total - 3))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(3):
        for x, y in DataLoader(data, 16, shuffle=True):
            nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(model.embed.weight, Net().embed.weight)  # frozen: untouched
    assert not model.embed.weight.requires_grad
    # the logged rate is the first group's (the head's, at the full rate)
    assert result["training_history"]["learning_rate"][0] == pytest.approx(1e-2 * factor(6))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_multipliers": {"backbone": 0}}, r"lr_multipliers\['backbone'\]=0 is invalid"),
        ({"lr_multipliers": ["backbone"]}, r"lr_multipliers=\['backbone'\] is invalid"),
        ({"frozen_parameters": "embed"}, r"frozen_parameters='embed' is invalid"),
    ],
)
def test_bad_fine_tuning_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_a_prefix_that_names_no_parameter_is_refused_before_any_work(quiet_config, tmp_path):
    data = DataLoader(make_classification(n=32), 16)
    for field, value in (("frozen_parameters", ("encoder",)), ("lr_multipliers", {"bakbone": 0.1})):
        config = TrainingConfig(**{**quiet_config, field: value})
        with pytest.raises(ValueError, match=f"{field}: .* matches no parameter of Net "):
            TrainingManager(config).train(Net(), data)
        assert not (tmp_path / "run").exists()  # nothing was written
