"""The batch and model-output rules: split a batch, call the model, read what it returns.

What a batch may be:
- `(inputs, targets)` or `(inputs,)`, or bare `inputs`;
- a mapping: its target under the first of `TARGET_KEYS` it has (`labels` first), the rest
  passed to the model as keyword arguments (`model(**inputs)`).

What a model may return (`prediction_of`):
- a tensor: the prediction;
- a tuple or list: its first element is the prediction (the rest is the model's own, e.g. a
  VAE's `(reconstruction, mu, logvar)`);
- a mapping or a Hugging Face `ModelOutput`: the first of `PREDICTION_KEYS` it holds
  (`logits` first), and `loss` when the model computed one;
- anything else: pass `output_transform`, a function from the output to the prediction.

The model's own loss (`ModelLoss`): when a mapping batch carries `labels`, the model's
`forward` has a `labels` parameter, and no loss function was given, the labels go into the
model and it trains on the `loss` it returns (the Hugging Face convention). That loss is taken
as a mean over the label positions it keeps: the labels that are not `ignore_index` (-100),
after dropping the first position of each row for a causal language model (its loss compares
the logits at position t with the label at t + 1). Micro-batches and ranks are weighed by that
count, so an accumulation window equals one big batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..system.devices import move_to_device  # noqa: F401 - its home before system.devices

TARGET_KEYS = ("labels", "targets", "target", "label", "y")
PREDICTION_KEYS = ("logits", "predictions", "prediction", "output", "outputs", "reconstruction")
OutputTransform = Callable[[Any], torch.Tensor]


@contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in (train or eval),
    however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return `(inputs, targets)`: `(x, y)` pairs, a bare `x`, or a dict with a label key."""
    if type(batch) in (list, tuple) and len(batch) == 2:  # the common case, before ABC checks
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(
            f"a batch tuple must be (inputs, targets) or (inputs,), got {len(batch)} elements"
        )
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        for key in TARGET_KEYS:
            if key in inputs:
                return inputs, inputs.pop(key)
        return inputs, None
    return batch, None


def check_loaders(**loaders: Any) -> None:
    """Refuse a map-style Dataset where a loader of batches belongs (it would be iterated
    sample by sample), naming the argument and the fix."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    validation = loaders.get("val_loader")
    if isinstance(validation, Iterator):
        raise TypeError(
            f"val_loader is {read_once(validation)}: every evaluation reads the validation "
            "data anew; pass a list of batches or a DataLoader"
        )
    for name, value in loaders.items():
        if isinstance(value, Dataset) and not isinstance(value, (DataLoader, IterableDataset)):
            stem = name.removesuffix("loader").rstrip("_") or "your"
            raise TypeError(
                f"{name} is a {type(value).__name__} (a dataset of samples), not a loader of "
                f"batches: pass DataLoader({stem}_dataset, batch_size=...) instead"
            )


def read_once(loader: Any) -> str:
    """How errors name a loader that is an iterator (a generator): it is read once."""
    return f"an iterator ({type(loader).__name__}), which can be read only once"


SHAPE_ERRORS = ("shapes cannot be multiplied", "channels, but got", "size mismatch")


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call the model: a dict of inputs becomes keyword arguments. Torch's error for a
    batch whose width the first layer cannot take is said naming the layer and the batch."""
    try:
        if not isinstance(inputs, torch.Tensor) and isinstance(inputs, Mapping):
            return model(**inputs)
        return model(inputs)
    except RuntimeError as error:
        if any(words in str(error) for words in DTYPE_ERRORS) and _dtypes_differ(model, inputs):
            raise RuntimeError(_dtype_mismatch(model, inputs, error)) from error
        if not any(words in str(error) for words in SHAPE_ERRORS):
            raise
        raise ValueError(_width_mismatch(model, inputs, error)) from error
    except ValueError as error:
        if ONE_SAMPLE_ERROR not in str(error):
            raise
        raise ValueError(
            "the model's batch norm cannot normalise a batch of one sample in training "
            f"({str(error).strip()}): the loader's last batch holds one sample (the dataset's "
            "size leaves one over batch_size); pass drop_last=True to the DataLoader, or "
            "another batch_size"
        ) from error


ONE_SAMPLE_ERROR = "Expected more than 1 value per channel when training"


DTYPE_ERRORS = ("must have the same dtype", "should be the same", "expected scalar type")


def _dtype_mismatch(model: nn.Module, inputs: Any, error: RuntimeError) -> str:
    """The batch's and the model's dtypes, for torch's dtype error (float64 inputs, e.g.
    from numpy, to a float32 model)."""
    given = {str(t.dtype).removeprefix("torch.") for t in _tensors(inputs)}
    weights = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    torch_says = str(error).strip().splitlines()[0]
    return (
        f"the model cannot take a batch of {', '.join(sorted(given)) or 'non-tensor'} inputs: "
        f"its weights are {', '.join(sorted(weights)) or 'none'} ({torch_says}); "
        + _conversion(given, weights)
    )


# how to make a tensor of this dtype, as the conversion advice names it
_TO_DTYPE = {"float32": ".float()", "float64": ".double()", "float16": ".half()",
             "bfloat16": ".bfloat16()"}  # fmt: skip


def _conversion(given: set[str], weights: set[str]) -> str:
    """Which way to convert: the data to the weights' dtype, or the model to the data's."""
    data = next((d for d in sorted(given) if d in _TO_DTYPE), None)
    model = next((w for w in sorted(weights) if w in _TO_DTYPE), None)
    if data is None or model is None or len(weights) != 1:
        return "convert the data or the model so that their floating-point dtypes agree"
    return (
        f"convert the data to {model} (x{_TO_DTYPE[model]}, or dtype=torch.{model} in the "
        f"dataset), or the model to {data} (model{_TO_DTYPE[data]})"
    )


def _dtypes_differ(model: nn.Module, inputs: Any) -> bool:
    """Whether the batch's floating-point inputs differ in dtype from the model's weights
    (torch says a device mismatch in words like a dtype one's; integer inputs are token
    ids or indices, not data to convert)."""
    given = {t.dtype for t in _tensors(inputs) if t.is_floating_point()}
    return bool(given) and not given <= {p.dtype for p in model.parameters()}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _tensors(part)]
    return []


def _width_mismatch(model: nn.Module, inputs: Any, error: RuntimeError) -> str:
    """The model's first layer and the batch's shape, for torch's shape error."""
    first = next(
        ((name, m) for name, m in model.named_modules() if hasattr(m, "in_features")
         or hasattr(m, "in_channels")),
        None,
    )  # fmt: skip
    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
    torch_says = str(error).strip().splitlines()[0]
    if first is None:
        return f"the model cannot take a batch of inputs {shape} ({torch_says})"
    name, layer = first
    wants = (
        f"{layer.in_features} input features"
        if hasattr(layer, "in_features")
        else f"{layer.in_channels} input channels"
    )
    return (
        f"the model cannot take a batch of inputs {shape}: its first layer "
        f"{repr(name) + ' ' if name else ''}({type(layer).__name__}) expects {wants} "
        f"({torch_says}); build the model for the data's width, or check the data's columns"
    )


def batch_size_of(inputs: Any) -> int:
    """The number of samples in `inputs` (the first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim else 1
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    if isinstance(inputs, (list, tuple)):
        for item in inputs:
            if isinstance(item, torch.Tensor):
                return batch_size_of(item)
    raise ValueError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")


def prediction_of(outputs: Any, transform: OutputTransform | None = None) -> torch.Tensor:
    """The prediction in a model's output (see the module docstring for the rule).

    Example:
        >>> import torch
        >>> prediction_of({"logits": torch.zeros(2, 3), "aux": 1.0}).shape
        torch.Size([2, 3])
    """
    if transform is not None:
        value = transform(outputs)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"output_transform returned {type(value).__name__}; it must return the "
                "prediction tensor"
            )
        return value
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    if isinstance(outputs, Mapping):
        for key in PREDICTION_KEYS:
            found = outputs.get(key)
            if isinstance(found, torch.Tensor):
                return found
    raise TypeError(_unreadable(outputs))


def _unreadable(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        what = f"a {type(outputs).__name__} with keys {', '.join(map(repr, outputs))}"
    elif isinstance(outputs, (tuple, list)):
        first = type(outputs[0]).__name__ if outputs else "nothing"
        what = f"a {type(outputs).__name__} whose first element is {first}"
    else:
        what = f"a {type(outputs).__name__}"
    keys = ", ".join(repr(k) for k in PREDICTION_KEYS)
    return (
        f"cannot read a prediction from the model's output, {what}: return a tensor, a tuple "
        f"whose first element is the prediction, or a mapping with one of the keys {keys}; "
        "or pass output_transform=<a function from the model's output to the prediction "
        "tensor> (to train() or Evaluator)"
    )


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss a model computed itself (`outputs["loss"]` of a mapping), if any."""
    if isinstance(outputs, Mapping):
        value = outputs.get("loss")
        return value if isinstance(value, torch.Tensor) else None
    return None


def reads_prediction(loss_function: Any) -> bool:
    """Whether a loss takes the prediction tensor (torch's losses, traineval's defaults) or
    the model's output as it returned it (any other function: e.g. a VAE's loss reads its
    `(reconstruction, mu, logvar)`)."""
    return isinstance(loss_function, nn.modules.loss._Loss) or bool(
        getattr(loss_function, "reads_prediction", False)
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def accepts_labels(model: nn.Module) -> bool:
    """Whether the model's `forward` has a `labels` parameter (Hugging Face models do)."""
    try:
        parameters = inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in parameters


def label_shift(model: nn.Module) -> int:
    """1 for a causal language model, whose loss compares the logits at position t with the
    label at t + 1 (Hugging Face `...ForCausalLM` / `...LMHeadModel`); 0 otherwise. A model
    may say so itself with a `label_shift` attribute."""
    inner = unwrap(model)
    own = getattr(inner, "label_shift", None)
    if isinstance(own, int):
        return own
    loss_type = getattr(inner, "loss_type", None)
    if loss_type == "ForCausalLM":
        return 1
    name = type(inner).__name__
    if loss_type is None and (name.endswith(("ForCausalLM", "LMHeadModel"))):
        return 1
    return 0


def shifted(
    prediction: torch.Tensor, targets: torch.Tensor, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(prediction, targets)` pairs a causal model is scored on: the logits at position
    t against the label at t + `shift`."""
    if shift == 0 or prediction.ndim < 3:
        return prediction, targets
    return prediction[:, :-shift], targets[:, shift:]


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """A model that computes its own loss from the batch's `labels` (see the module docstring).

    `shift` is the label positions a causal model drops at the start of each row.
    """

    shift: int = 0
    ignore_index: int = -100

    @classmethod
    def of(cls, model: nn.Module) -> ModelLoss | None:
        """The rule for `model` when its forward takes `labels`, else None."""
        if not accepts_labels(model):
            return None
        return cls(shift=label_shift(model))

    @staticmethod
    def applies(batch: Any) -> bool:
        """Whether `batch` carries labels for the model (a mapping with `labels`)."""
        return isinstance(batch, Mapping) and "labels" in batch

    def items(self, labels: torch.Tensor, exact: bool = True) -> int | torch.Tensor:
        """How many label positions the model's mean loss is over (a device tensor when
        they must be counted: no host sync). Sample-level labels count as samples unless
        `exact` (a window's shares, evaluation), as `loss_weight` does."""
        if labels.is_floating_point() or (labels.ndim < 2 and not exact):
            return int(labels.shape[0]) if labels.ndim else 1
        kept = labels[..., self.shift :] if self.shift and labels.ndim >= 2 else labels
        return (kept != self.ignore_index).sum()

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, torch.Tensor]:
        """Run the model with the labels; return its output and its loss."""
        outputs = model(**batch)
        loss = loss_of(outputs)
        if loss is None:
            raise ValueError(
                f"the model ({type(unwrap(model)).__name__}) was given labels but returned no "
                "loss (expected a mapping or ModelOutput with 'loss'); pass loss_function to "
                "compute the loss from its prediction instead"
            )
        return outputs, loss


def unsqueezed(prediction: torch.Tensor, inputs: Any) -> torch.Tensor:
    """A batch of one sample's prediction with its batch dimension back: a model whose
    forward ends in `.squeeze()` returns `(C,)` scores (or a 0-d logit or value) there,
    which the loss and the metrics would read as C samples (or none); as `(1, C)` (or
    `(1,)`) they read it as the other batches."""
    if prediction.ndim > 1:
        return prediction
    if prediction.ndim == 0:
        return prediction.reshape(1)
    try:
        one = batch_size_of(inputs) == 1
    except ValueError:  # inputs of no tensor: nothing to tell the batch from
        return prediction
    return prediction[None] if one and prediction.shape[0] != 1 else prediction
