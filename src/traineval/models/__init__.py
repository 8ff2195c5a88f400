"""Small built-in models for config-driven runs, and a user's own by import path."""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config.code_references import called, import_object
from .options import check_options, check_size
from .policies import ActorCritic, RunningNorm

__all__ = [
    "MLP",
    "MODELS",
    "VAE",
    "ActorCritic",
    "Autoencoder",
    "RunningNorm",
    "SmallCNN",
    "build_model",
]


def _mlp_layers(
    sizes: Sequence[int], dropout: float, last_activation: bool = False
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Fully connected network; inputs of any shape are flattened after the batch dimension."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_sizes: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = _mlp_layers([input_dim, *hidden_sizes, output_dim], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks, a 2x2 max-pool and a small head, for small images (e.g. 8x8 digits)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: Sequence[int],
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        height, width = (size // 2 for size in image_size)  # MaxPool2d(2) floors
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * height * width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


OUTPUT_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _output_activation(name: str | None) -> Any:
    if name is not None and name not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"output_activation={name!r} is invalid: expected null, 'sigmoid' (inputs in "
            "[0, 1], e.g. pixels / 255) or 'tanh' (inputs in [-1, 1])"
        )
    return OUTPUT_ACTIVATIONS.get(name) if name else None


class Autoencoder(nn.Module):
    """MLP encoder to a `latent_dim` code and a mirrored decoder; returns the reconstruction.

    `output_activation` bounds the reconstruction as the inputs are bounded: "sigmoid" for
    inputs in [0, 1] (e.g. pixels / 255), "tanh" for [-1, 1], None for unbounded ones
    (standardised features). On digits scaled to [0, 1] a sigmoid output lowers the test
    MSE from 0.0125 to 0.0112 (docs/modes-unsupervised.md).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int] = (64,),
        latent_dim: int = 8,
        output_activation: str | None = None,
    ):
        super().__init__()
        self.encoder = _mlp_layers([input_dim, *hidden_sizes, latent_dim], 0.0)
        self.decoder = _mlp_layers([latent_dim, *reversed(hidden_sizes), input_dim], 0.0)
        self.output_activation = output_activation
        self._bound = _output_activation(output_activation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encode(x))
        if self._bound is not None:
            out = self._bound(out)
        return out.reshape(x.shape)


class VAE(nn.Module):
    """Variational autoencoder (Kingma and Welling, 2014): an MLP encoder to the mean and
    log-variance of a `latent_dim` Gaussian code, a mirrored decoder.

    Returns `{"reconstruction", "mean", "log_var"}`: in training mode the code is sampled
    (reparameterised; the noise comes from torch's generator, which checkpoints capture),
    in eval mode it is the mean. `encode` gives the mean (for linear probes). Train it with
    `Unsupervised(objective="elbo")`.
    """

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int] = (64,), latent_dim: int = 8):
        super().__init__()
        self.encoder = _mlp_layers([input_dim, *hidden_sizes], 0.0, last_activation=True)
        width = hidden_sizes[-1] if hidden_sizes else input_dim
        self.mean = nn.Linear(width, latent_dim)
        self.log_var = nn.Linear(width, latent_dim)
        self.decoder = _mlp_layers([latent_dim, *reversed(hidden_sizes), input_dim], 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(self.encoder(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x.flatten(1))
        mean, log_var = self.mean(h), self.log_var(h)
        code = mean
        if self.training:
            noise = torch.randn(mean.shape).to(mean.device, mean.dtype)
            code = mean + noise * torch.exp(0.5 * log_var)
        reconstruction = self.decoder(code).reshape(x.shape)
        return {"reconstruction": reconstruction, "mean": mean, "log_var": log_var}


MODELS = ("mlp", "cnn", "autoencoder", "vae", "actor_critic")
_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": MLP, "cnn": SmallCNN, "autoencoder": Autoencoder, "vae": VAE,
    "actor_critic": ActorCritic,
}  # fmt: skip


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    output_dim: int,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a built-in model for data of `input_shape` (one sample) and `output_dim` outputs.

    `name` is one of `mlp`, `cnn`, `autoencoder`, `vae`, `actor_critic`, or an import path
    `package.module:factory` called as `factory(input_shape=..., output_dim=..., **options)`.
    """
    options = dict(options or {})
    if name in MODELS:
        check_options(options)
        refuse_unknown_options(name, options)
        build = _builder(name, tuple(input_shape), output_dim, options)
        try:
            check_size(name, options, build)
            return build()
        except TypeError as error:
            raise ValueError(
                f"model.options={options!r} do not fit model {name!r}: {error}"
            ) from None
    if ":" in name:
        factory = import_object(name, field="model.name")
        _check_factory(name, factory, tuple(input_shape), output_dim, options)
        model = called(
            factory, "model.name", input_shape=tuple(input_shape), output_dim=output_dim, **options
        )
        if not isinstance(model, nn.Module):
            raise ValueError(f"model.name={name!r} returned {type(model).__name__}, not a Module")
        return model
    raise ValueError(
        f"model.name={name!r} is invalid: expected one of {', '.join(map(repr, MODELS))} or an "
        "import path 'package.module:factory'"
    )


def option_default(name: str, option: str) -> Any:
    """The default of built-in model `name`'s `option` (None where it has none)."""
    parameter = inspect.signature(_CLASSES[name]).parameters.get(option)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    default = parameter.default
    return list(default) if isinstance(default, tuple) else default


def refuse_unknown_options(name: str, options: Mapping[str, Any]) -> None:
    """An option the built-in model does not take is named with its closest option and the
    model's options (the sizes traineval passes itself, from the data, are not options)."""
    parameters = list(inspect.signature(_CLASSES[name]).parameters)
    taken = {"input_dim", "output_dim", "in_channels", "num_classes", "image_size"}
    allowed = [p for p in parameters if p not in taken]
    for key in options:
        if key not in parameters:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"model.options.{key} is not an option of model {name!r}{hint}; its options: "
                f"{', '.join(allowed)}"
            )


def _builder(
    name: str, input_shape: tuple[int, ...], output_dim: int, options: dict[str, Any]
) -> Callable[[], nn.Module]:
    """A call that builds built-in model `name` (refusing inputs it cannot take)."""
    input_dim = math.prod(input_shape)
    if name == "cnn" and len(input_shape) != 3:
        raise ValueError(
            f"model.name='cnn' needs image inputs (channels, height, width), got samples of "
            f"shape {input_shape}; set data.image_shape"
        )
    return {
        "mlp": lambda: MLP(input_dim, output_dim, **options),
        "autoencoder": lambda: Autoencoder(input_dim, **options),
        "vae": lambda: VAE(input_dim, **options),
        "actor_critic": lambda: ActorCritic(input_dim, output_dim, **options),
        "cnn": lambda: SmallCNN(input_shape[0], output_dim, input_shape[1:], **options),
    }[name]


def _check_factory(
    name: str, factory: Any, input_shape: tuple[int, ...], output_dim: int, options: dict[str, Any]
) -> None:
    """A model factory is called as `factory(input_shape=..., output_dim=..., **options)`:
    one that cannot take that call is refused naming the signature it needs."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin or C function: the call itself will tell
    try:
        signature.bind(input_shape=input_shape, output_dim=output_dim, **options)
    except TypeError as error:
        raise ValueError(
            f"model.name={name!r} cannot be called as traineval calls a model factory, "
            f"factory(input_shape={input_shape}, output_dim={output_dim}"
            f"{''.join(f', {k}=...' for k in options)}) ({error}); define it as "
            f"def {getattr(factory, '__name__', 'factory')}(input_shape, output_dim, "
            "**options) -> nn.Module (model.options are passed as keyword arguments)"
        ) from None
