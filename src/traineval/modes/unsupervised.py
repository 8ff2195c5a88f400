"""Unsupervised mode (autoencoders, VAEs): the loss compares the model's output with its input.

`objective="reconstruction"` (the default): the loss function (MSE unless you give one)
between the model's reconstruction and its input. `objective="elbo"`: the negative evidence
lower bound of a variational autoencoder whose output holds `reconstruction`, `mean` and
`log_var` (the built-in `VAE`):

    mean over samples of  sum_features (reconstruction - x)^2
                          + beta * KL(N(mean, exp(log_var)) || N(0, I))

(a Gaussian likelihood; `beta` weighs the code's divergence from the prior, a beta-VAE
above 1). Validation reports the reconstruction's regression metrics either way, and with
`linear_probe=True` also `probe_accuracy`: a logistic regression fitted on the codes
(`model.encode`) of the train loader's labeled samples, scored on the validation ones
(`traineval.evaluation.probe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from ..config.checks import Flag, Int, Number, OneOf
from ..config.training_config import setting
from ..training.batches import OutputTransform, prediction_of, reads_prediction
from .base import (
    LossFunction,
    StepOutput,
    batch_size_of,
    compiled_loss,
    count_required_args,
    forward,
    split_batch,
)
from .contract import Context, Mode, ModePlan, register

OBJECTIVES = ("reconstruction", "elbo")


@register
@dataclasses.dataclass(frozen=True)
class Unsupervised(Mode):
    """Input-only batches (autoencoders, VAEs): the output is compared with the input;
    validation reports regression metrics of the reconstruction.

    Settings: `objective` ("reconstruction": the loss function, MSE by default; "elbo": a
    VAE's negative ELBO), `beta` (the ELBO's KL weight), `linear_probe` (add
    `probe_accuracy` to each validation: a logistic regression on the codes, fitted on the
    train loader's labeled samples), `probe_samples` (at most this many samples per side).
    """

    name: ClassVar[str] = "unsupervised"
    reconstructs: ClassVar[bool] = True
    objective: str = setting("reconstruction", OneOf(OBJECTIVES))
    beta: float = setting(1.0, Number(0.0))
    linear_probe: bool = setting(False, Flag())
    probe_samples: int = setting(20_000, Int(2))

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.objective == "elbo" and ctx.user_loss:
            raise ValueError(
                "loss_function is not used with unsupervised.objective='elbo' (the loss is "
                "the negative ELBO of the model's reconstruction, mean and log_var); leave it "
                "None, or use objective='reconstruction' with your loss"
            )
        if self.linear_probe and ctx.val_loader is None:
            raise ValueError(
                "unsupervised.linear_probe=True scores the codes of the validation samples: "
                "pass a val_loader (with class labels)"
            )

    def plan(self, ctx: Context) -> ModePlan:
        step: UnsupervisedStep | ELBOStep
        if self.objective == "elbo":
            step = ELBOStep(self.beta)
        else:
            step = UnsupervisedStep(
                ctx.loss_function, ctx.compile_mode, output_transform=ctx.output_transform
            )
        extra = None
        if self.linear_probe:
            from ..evaluation.probe import linear_probe

            train, val, limit = ctx.train_data, ctx.val_loader, self.probe_samples

            def extra(model: nn.Module) -> dict[str, float]:
                return linear_probe(model, train, val, limit=limit)

        names = ("probe_accuracy",) if self.linear_probe else ()
        return ModePlan(step, extra_metrics=extra, extra_metric_names=names)


class UnsupervisedStep:
    """Step function for input-only batches; labels in the batch, if any, are ignored.

    A two-argument loss is called as `loss(outputs, inputs)`; a one-argument loss as
    `loss(outputs)` (for models that return what the loss needs, e.g. a VAE's terms). The
    default loss and torch's losses get the model's prediction (the reconstruction: see
    `traineval.training.batches`), a loss function of your own the output as the model returned it.
    """

    def __init__(
        self,
        loss_function: LossFunction,
        compile_mode: str | None = None,
        *,
        output_transform: OutputTransform | None = None,
    ) -> None:
        self.loss_function = loss_function
        self._loss = compiled_loss(loss_function, compile_mode)
        self.takes_inputs = count_required_args(loss_function) >= 2
        self.output_transform = output_transform
        self._reads_prediction = reads_prediction(loss_function)

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, _ = split_batch(batch)
        outputs = forward(model, inputs)
        if self._reads_prediction:  # the reconstruction; a loss of your own gets the output
            outputs = prediction_of(outputs, self.output_transform)
        loss = self._loss(outputs, inputs) if self.takes_inputs else self._loss(outputs)
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=loss, weight=num_samples, num_samples=num_samples, outputs=outputs, targets=inputs
        )

    def weight(self, batch: Any) -> int:
        """Every sample counts once (a mean over equal-sized samples)."""
        return batch_size_of(split_batch(batch)[0])


class ELBOStep:
    """The negative ELBO of a VAE's output (see the module docstring)."""

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, _ = split_batch(batch)
        out = forward(model, inputs)
        if not isinstance(out, Mapping) or not {"reconstruction", "mean", "log_var"} <= set(out):
            raise ValueError(
                "unsupervised.objective='elbo' needs a model returning a mapping with "
                "'reconstruction', 'mean' and 'log_var' (e.g. traineval.models.VAE)"
            )
        reconstruction, mean, log_var = out["reconstruction"], out["mean"], out["log_var"]
        squared = (reconstruction.float() - inputs.float()) ** 2
        kl = -0.5 * (1 + log_var - mean**2 - log_var.exp()).float().flatten(1).sum(1)
        per_sample = squared.flatten(1).sum(1) + self.beta * kl
        num_samples = batch_size_of(inputs)
        return StepOutput(
            loss=per_sample.mean(),
            weight=num_samples,
            num_samples=num_samples,
            outputs=reconstruction,
            targets=inputs,
            metrics={"kl": kl.detach().mean()},
        )

    weight = UnsupervisedStep.weight  # every sample counts once
