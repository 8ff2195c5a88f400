"""What a step returns is not kept alive through backward: a language model's logits
(batch x sequence x vocabulary) can be the largest tensor of the step."""

from __future__ import annotations

import weakref

from torch import nn
from torch.utils.data import DataLoader

from traineval import TrainingConfig, TrainingManager
from traineval.modes import Mode, ModePlan, StepOutput

from conftest import make_classification


def test_the_step_s_outputs_are_released_before_backward(quiet_config):
    alive_during_backward: list[bool] = []
    refs: list[weakref.ref] = []

    class Recorded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 3)
            self.linear.weight.register_hook(self._during_backward)

        def _during_backward(self, grad):
            alive_during_backward.append(refs[-1]() is not None)
            return grad

        def forward(self, x):
            return self.linear(x)

    def step(model, batch):
        x, y = batch
        logits = model(x)
        refs.append(weakref.ref(logits))
        # a loss whose backward does not keep the logits (a sum saves nothing)
        loss = logits.sum() / len(x) + 0.0 * y.float().sum()
        return StepOutput(loss=loss, weight=len(x), num_samples=len(x), outputs=logits, targets=y)

    step.weight = lambda batch: len(batch[0])  # type: ignore[attr-defined]

    class Plain(Mode):
        name = "plain_for_a_memory_test"

        def plan(self, ctx):
            return ModePlan(step)

    config = TrainingConfig(num_epochs=1, batch_size=8, gradient_accumulation_steps=2,
                            **quiet_config)  # fmt: skip
    TrainingManager(config).train(Recorded(), DataLoader(make_classification(n=32), 8),
                                  mode=Plain())  # fmt: skip
    assert alive_during_backward == [False] * 4  # 4 micro-batches, none kept
