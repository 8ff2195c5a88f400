"""Evaluating several models as one: mean probabilities (classification), mean predictions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.training_config import TaskType
from ..runs.checkpoint import load_checkpoint_file
from ..training.batches import OutputTransform, label_shift, prediction_of


class EnsembleModule(nn.Module):
    """Average members' outputs: probabilities for classification and generation (returned
    as log-probabilities, so argmax, cross-entropy and softmax read them correctly), plain
    means for regression. With one binary logit, and for each label of a multi-label task,
    the mean sigmoid probability returns as a logit. Members' outputs are read by the rule of
    `traineval.training.batches` (or `output_transform`).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        task_type: TaskType | None = None,
        output_transform: OutputTransform | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.task_type = task_type
        self.output_transform = output_transform
        self.label_shift = label_shift(members[0])  # causal members: scored on the next token

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = [
            prediction_of(member(*args, **kwargs), self.output_transform) for member in self.members
        ]
        first = outputs[0]
        task = self.task_type
        if task is None:
            task = TaskType.REGRESSION
            if first.ndim == 3 or (first.ndim == 2 and first.shape[1] > 1):
                task = TaskType.CLASSIFICATION
        if task is TaskType.REGRESSION:
            return torch.stack(outputs).mean(0)
        if task is TaskType.MULTILABEL or first.ndim == 1 or first.shape[-1] == 1:
            # one logit per label (or a binary task's one): mean probability, as a logit
            p = torch.stack([torch.sigmoid(o.float()) for o in outputs]).mean(0)
            return torch.log(p) - torch.log1p(-p)
        probabilities = torch.stack([torch.softmax(o.float(), dim=-1) for o in outputs]).mean(0)
        return torch.log(probabilities)


def load_members(
    models_or_paths: Sequence[nn.Module | str | Path],
    model_factory: Callable[[], nn.Module] | None,
    device: torch.device,
) -> list[nn.Module]:
    """Models as given, and checkpoint paths loaded (weights only) into `model_factory()`."""
    members = []
    for item in models_or_paths:
        if isinstance(item, nn.Module):
            members.append(item.to(device))
            continue
        if model_factory is None:
            raise ValueError(
                f"{str(item)!r} is a checkpoint path: pass model_factory to build its model"
            )
        model = model_factory()
        model.load_state_dict(load_checkpoint_file(item, map_location=device)["model"])
        members.append(model.to(device))
    return members
