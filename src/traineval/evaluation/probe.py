"""Linear-probe evaluation of learned representations (autoencoders, VAEs, contrastive models).

The standard protocol: freeze the model, embed the labeled samples of a fit set and of an
evaluation set with its encoder, fit a multinomial logistic regression (scikit-learn's, on
standardised codes) on the fit set and report its accuracy on the evaluation set. The
encoder is `model.encode(inputs)` (the built-in `Autoencoder` and `VAE` have one; a VAE's is
its mean), or the function given.

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from traineval.models import Autoencoder
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(80, 4), torch.arange(80) % 2
    >>> x[:, 0] += 8 * y  # one direction separates the classes
    >>> data = DataLoader(TensorDataset(x, y), batch_size=16)
    >>> linear_probe(Autoencoder(4, latent_dim=4), data, data)["probe_accuracy"] > 0.9
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..training.batches import forward, in_eval_mode, move_to_device, split_batch

__all__ = ["embed", "linear_probe"]

Encode = Callable[[Any], torch.Tensor]


def _encoder(model: nn.Module, encode: Encode | None) -> Encode:
    if encode is not None:
        return encode
    inner = getattr(model, "module", model)  # a DDP wrapper's
    method = getattr(inner, "encode", None)
    if not callable(method):
        raise ValueError(
            f"a linear probe needs the model's codes: {type(inner).__name__} has no encode() "
            "method; give encode=<function from inputs to codes>"
        )
    return lambda inputs: forward(method, inputs)


@torch.no_grad()
def embed(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    encode: Encode | None = None,
    device: torch.device | str | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes, labels) of the labeled samples in `loader` (labels >= 0; -1 marks unlabeled
    ones, which are skipped), at most `limit` of them, in eval mode."""
    encoder = _encoder(model, encode)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    codes, labels = [], []
    seen = 0
    with in_eval_mode(model):
        for batch in loader:
            inputs, targets = split_batch(move_to_device(batch, device))
            if targets is None or targets.is_floating_point() or targets.ndim != 1:
                raise ValueError(
                    "a linear probe needs (inputs, class ids) batches; got targets "
                    + ("none" if targets is None else f"of shape {tuple(targets.shape)}")
                )
            kept = targets >= 0
            code = encoder(inputs).flatten(1)[kept]
            codes.append(code.float().cpu().numpy())
            labels.append(targets[kept].cpu().numpy())
            seen += int(kept.sum())
            if limit is not None and seen >= limit:
                break
    if not codes:
        raise ValueError("a linear probe needs labeled samples; the loader yielded none")
    x, y = np.concatenate(codes), np.concatenate(labels)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


@contextlib.contextmanager
def untouched(loader: Iterable[Any]) -> Iterator[Iterable[Any]]:
    """`loader`'s batches as it gives them (its sampler, its shuffle: a subset sampler's
    samples, a random subset of a sorted dataset), read without touching it: a loader of
    their own in this process, and the generators it draws from put back after. Iterating
    the training's loader drew its shuffle (a run with a probe trained on another order than
    without it, and a resume after a mid-epoch probe on yet another), and restarted its
    persistent workers' iterator."""
    if not isinstance(loader, DataLoader):
        yield loader
        return
    generators = [loader.generator, getattr(loader.sampler, "generator", None)]
    kept = [(g, g.get_state()) for g in generators if isinstance(g, torch.Generator)]
    try:
        yield _private(loader)
    finally:
        for generator, state in kept:
            generator.set_state(state)


def _private(loader: DataLoader[Any]) -> DataLoader[Any]:
    """A loader of `loader`'s dataset with its sampling and collation, without workers."""
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
        )
    if loader.batch_sampler is None:  # the dataset's items are batches already
        return DataLoader(
            loader.dataset, sampler=loader.sampler, batch_size=None, collate_fn=loader.collate_fn
        )
    return DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        collate_fn=loader.collate_fn,
        generator=loader.generator,
    )


def linear_probe(
    model: nn.Module,
    fit_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    *,
    encode: Encode | None = None,
    device: torch.device | str | None = None,
    limit: int | None = 20_000,
) -> dict[str, float]:
    """`{"probe_accuracy": ...}`: a logistic regression fitted on the codes of
    `fit_loader`'s labeled samples (at most `limit`), scored on `eval_loader`'s."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with untouched(fit_loader) as fit, untouched(eval_loader) as evaluated:
        x_fit, y_fit = embed(model, fit, encode=encode, device=device, limit=limit)
        x_eval, y_eval = embed(model, evaluated, encode=encode, device=device, limit=limit)
    if len(np.unique(y_fit)) < 2:
        raise ValueError("a linear probe needs at least two classes among the fit samples")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_fit, y_fit)
    return {"probe_accuracy": float((probe.predict(x_eval) == y_eval).mean())}
