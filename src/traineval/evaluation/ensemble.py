"""Evaluating several models as one: mean probabilities (classification), mean predictions."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.training_config import TaskType
from ..runs.checkpoint import load_checkpoint_file
from ..training.batches import (
    OutputTransform,
    forward,
    in_eval_mode,
    label_shift,
    move_to_device,
    prediction_of,
    split_batch,
)
from .metrics import are_probabilities, as_logits


class EnsembleModule(nn.Module):
    """Average members' outputs: probabilities for classification and generation (returned
    as log-probabilities, so argmax, cross-entropy and softmax read them correctly), plain
    means for regression. With one binary logit, and for each label of a multi-label task,
    the mean sigmoid probability returns as a logit. Members' outputs are read by the rule of
    `traineval.training.batches` (or `output_transform`); a member whose class scores are
    probabilities already (it ends in a softmax) is read as single-model evaluation reads it
    (`are_probabilities`, decided on its first batch): its probabilities as they are, not
    their softmax, so a one-member ensemble scores as its member does.
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
        self.given_probabilities: list[bool] | None = None  # each member's, from its first batch

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = [
            prediction_of(member(*args, **kwargs), self.output_transform) for member in self.members
        ]
        same_shapes(outputs)
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
        if self.given_probabilities is None:  # decided once, in the outputs' own dtype
            self.given_probabilities = [are_probabilities(o) for o in outputs]
        # log of the mean probability, from each member's log-probabilities (no underflow)
        logs = [
            as_logits(o.float()) if given else torch.log_softmax(o.float(), dim=-1)
            for o, given in zip(outputs, self.given_probabilities, strict=True)
        ]
        return torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(logs))


def same_shapes(outputs: Sequence[torch.Tensor], what: str = "a batch") -> None:
    """Refuse members whose predictions differ in shape (3 classes beside 4, one logit beside
    two scores), naming the members and their columns: their mean is undefined."""
    first = outputs[0]
    for index, output in enumerate(outputs[1:], start=1):
        if output.shape != first.shape:
            columns = [o.shape[-1] if o.ndim > 1 else 1 for o in (first, output)]
            raise ValueError(
                f"models_or_checkpoint_paths[{index}] predicts shape {tuple(output.shape)} "
                f"({columns[1]} classes or outputs a sample) on {what} where "
                f"models_or_checkpoint_paths[0] predicts {tuple(first.shape)} ({columns[0]}): "
                "an ensemble averages members that score the same classes (or outputs)"
            )


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


def check_members(
    members: Sequence[nn.Module],
    loader: Iterable[Any],
    device: torch.device,
    transform: OutputTransform | None,
) -> None:
    """Run every member on the loader's first batch and refuse members whose predictions
    differ in shape (different classes), before any member is evaluated in full."""
    batch = next(iter(loader), None)
    if batch is None or len(members) < 2:
        return  # (the evaluation refuses a loader without batches)
    inputs, _ = split_batch(move_to_device(batch, device) if device.type != "cpu" else batch)
    outputs = []
    with torch.inference_mode():
        for member in members:
            with in_eval_mode(member):
                outputs.append(prediction_of(forward(member, inputs), transform))
    same_shapes(outputs, "the loader's first batch")
