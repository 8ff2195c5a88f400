"""Batch augmentations, weak and strong, for images and tabular features (semi-supervised mode).

An augmentation is a function from a batch of inputs to a batch of the same shape. These
run on the batch's device, vectorised over the samples, and draw from torch's global
generator, which checkpoints capture: a resumed run draws the augmentations an
uninterrupted one would.

- `ImageAugment("weak")`: a random translation of up to `shift` of the image side (and a
  horizontal flip with `flip=True`), as FixMatch's weak augmentation.
- `ImageAugment("strong")`: RandAugment-like (Cubuk et al., 2020, with random magnitudes
  as FixMatch uses it): `ops` operations per image drawn from translate, rotate, shear,
  scale, contrast, brightness, sharpness-like blur, noise and identity, then Cutout of a
  square of `cutout` of the side.
- `TabularAugment("weak" | "strong")`: Gaussian noise scaled by each feature's standard
  deviation in the batch; strong adds feature dropout (features replaced by their batch
  mean).

Images are `(N, C, H, W)`, or flat `(N, C*H*W)` with `image_shape=(C, H, W)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ..config.checks import fail

__all__ = ["ImageAugment", "TabularAugment", "augmentation_pair"]

Augmentation = Callable[[torch.Tensor], torch.Tensor]
STRENGTHS = ("weak", "strong")
GEOMETRIC = ("translate_x", "translate_y", "rotate", "shear_x", "shear_y", "scale")
PHOTOMETRIC = ("contrast", "brightness", "blur", "noise")
OPS = ("identity", *GEOMETRIC, *PHOTOMETRIC)


def _uniform(n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n).to(like.device, like.dtype) * (high - low) + low


@dataclasses.dataclass(repr=False, eq=False)  # compared and hashed as an object, as before
class ImageAugment:
    """Weak or strong augmentation of image batches; see the module docstring. The knobs
    after `strength` are keyword-only."""

    strength: str = "weak"
    _: dataclasses.KW_ONLY
    image_shape: Sequence[int] | None = None
    shift: float = 0.125
    flip: bool = False
    ops: int = 2
    cutout: float = 0.5
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            fail("augmentation strength", self.strength, "expected 'weak' or 'strong'")
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)

    def __repr__(self) -> str:
        return f"ImageAugment({self.strength!r}, image_shape={self.image_shape})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = self._images(x)
        n = images.shape[0]
        theta = torch.eye(2, 3, dtype=images.dtype, device=images.device).repeat(n, 1, 1)
        shift = _uniform(n * 2, -self.shift, self.shift, images).view(n, 2)
        theta[:, :, 2] = (shift * images.shape[-1]).round() * 2 / images.shape[-1]
        if self.flip:
            theta[:, 0, 0] = torch.where(torch.rand(n, device=images.device) < 0.5, -1.0, 1.0)
        chosen = self._chosen(n, images) if self.strength == "strong" else None
        if chosen is not None:
            theta = theta @ self._geometric(chosen, images)
        out = self._warp(images, theta)
        if chosen is not None:
            out = self._photometric(out, chosen)
            out = self._cut(out)
        return out.reshape(x.shape)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_shape is not None:
            size = math.prod(self.image_shape)
            if x[0].numel() != size:
                raise ValueError(
                    f"image_shape={list(self.image_shape)} holds {size} values, the inputs have "
                    f"{x[0].numel()} per sample (shape {tuple(x.shape[1:])}): give the (C, H, W) "
                    "that the flat inputs are"
                )
            return x.reshape(x.shape[0], *self.image_shape)
        if x.ndim != 4:
            raise ValueError(
                f"image augmentation needs (N, C, H, W) images, got shape {tuple(x.shape)}: "
                "give image_shape=(C, H, W) for flat inputs"
            )
        return x

    def _chosen(self, n: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per operation, its magnitude in [-1, 1] for the images that drew it, else 0."""
        picks = torch.randint(len(OPS), (n, self.ops))
        magnitude = torch.rand(n, self.ops) * 2 - 1
        chosen = {}
        for i, name in enumerate(OPS):
            hit = picks == i
            chosen[name] = (magnitude * hit).sum(1).to(like.device, like.dtype)
        return chosen

    @staticmethod
    def _geometric(chosen: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """(N, 3, 3) affine matrices of the chosen geometric operations (identity where none)."""
        n = like.shape[0]
        m = torch.eye(3, dtype=like.dtype, device=like.device).repeat(n, 1, 1)
        angle = chosen["rotate"] * math.radians(30)
        scale = 1 + 0.3 * chosen["scale"]
        m[:, 0, 0] = torch.cos(angle) * scale
        m[:, 0, 1] = -torch.sin(angle) * scale + 0.3 * chosen["shear_x"]
        m[:, 1, 0] = torch.sin(angle) * scale + 0.3 * chosen["shear_y"]
        m[:, 1, 1] = torch.cos(angle) * scale
        m[:, 0, 2] = 0.6 * chosen["translate_x"]  # up to 30% of the side (grid spans 2)
        m[:, 1, 2] = 0.6 * chosen["translate_y"]
        return m

    @staticmethod
    def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta[:, :2], list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)

    @staticmethod
    def _photometric(images: torch.Tensor, chosen: dict[str, torch.Tensor]) -> torch.Tensor:
        def per_image(values: torch.Tensor) -> torch.Tensor:
            return values.view(-1, *([1] * (images.ndim - 1)))

        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + (images - mean) * per_image(1 + 0.9 * chosen["contrast"])
        out = out * per_image(1 + 0.9 * chosen["brightness"])
        kernel = torch.ones(images.shape[1], 1, 3, 3, dtype=images.dtype, device=images.device)
        blurred = F.conv2d(
            F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel / 9, groups=out.shape[1]
        )
        blur = per_image(chosen["blur"].abs())
        out = out * (1 - blur) + blurred * blur
        spread = images.std(dim=(1, 2, 3), keepdim=True)
        noise = per_image(0.3 * chosen["noise"].abs()) * spread
        return out + noise * torch.randn(out.shape).to(out.device, out.dtype)

    def _cut(self, images: torch.Tensor) -> torch.Tensor:
        """Cutout: a square of `cutout` of the side, at a random centre, set to `fill`."""
        if self.cutout <= 0:
            return images
        n, _, h, w = images.shape
        size = max(1, round(self.cutout * min(h, w)))
        cy = torch.randint(h, (n,)).to(images.device)
        cx = torch.randint(w, (n,)).to(images.device)
        rows = torch.arange(h, device=images.device).view(1, h, 1)
        cols = torch.arange(w, device=images.device).view(1, 1, w)
        inside = ((rows - cy.view(n, 1, 1)).abs() <= size // 2) & (
            (cols - cx.view(n, 1, 1)).abs() <= size // 2
        )
        return torch.where(inside.unsqueeze(1), torch.full_like(images, self.fill), images)


class TabularAugment:
    """Weak or strong augmentation of feature batches `(N, features)`; see the module docstring."""

    def __init__(
        self, strength: str = "weak", *, noise: float | None = None, dropout: float = 0.2
    ) -> None:
        if strength not in STRENGTHS:
            fail("augmentation strength", strength, "expected 'weak' or 'strong'")
        self.strength = strength
        self.noise = noise if noise is not None else (0.05 if strength == "weak" else 0.2)
        self.dropout = dropout if strength == "strong" else 0.0

    def __repr__(self) -> str:
        return f"TabularAugment({self.strength!r})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spread = x.std(dim=0, keepdim=True) if x.shape[0] > 1 else torch.ones_like(x[:1])
        out = x + self.noise * spread * torch.randn(x.shape).to(x.device, x.dtype)
        if self.dropout > 0:
            dropped = (torch.rand(x.shape) < self.dropout).to(x.device)
            out = torch.where(dropped, x.mean(dim=0, keepdim=True).expand_as(x), out)
        return out


def augmentation_pair(kind: str, image_shape: Any = None) -> tuple[Augmentation, Augmentation]:
    """The built-in (weak, strong) pair called `kind`: "image" or "tabular"."""
    if kind == "image":
        return ImageAugment("weak", image_shape=image_shape), ImageAugment(
            "strong", image_shape=image_shape
        )
    if kind == "tabular":
        return TabularAugment("weak"), TabularAugment("strong")
    fail("augmentation", kind, "expected 'image' or 'tabular' (or your own functions)")
