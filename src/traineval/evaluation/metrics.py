"""Streaming metrics: `update` per batch on the model's device, `compute` once, `reset`.

State is bounded by the number of classes (or outputs), never by the number of samples, and
updates do not wait for the device. Results agree with scikit-learn on the concatenated data.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.nn import functional as F

from ..tasks import align_regression

logger = logging.getLogger(__name__)


def _accum_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else accumulate in float64 to match scikit-learn.
    return torch.float32 if device.type == "mps" else torch.float64


def class_probabilities(scores: torch.Tensor, *, detect: bool = True) -> torch.Tensor:
    """(N, C) class probabilities of classification scores: the softmax of (N, C) logits,
    or [1 - p, p] with p the sigmoid of one binary logit ((N,) or (N, 1)); (N, C) scores
    that are probabilities already (`are_probabilities`, unless `detect` is off: the
    caller has decided) as they are."""
    if scores.ndim == 1 or scores.shape[1] == 1:
        positive = torch.sigmoid(scores.reshape(-1))
        return torch.stack([1 - positive, positive], dim=1)
    if detect and are_probabilities(scores):
        return scores
    return torch.softmax(scores, dim=1)


_PROBABILITIES_SAID = [False]


def are_probabilities(scores: torch.Tensor) -> bool:
    """Whether (N, C) scores are class probabilities already (a model ending in a softmax):
    every value in [0, 1] and every row summing to 1. Their softmax is not them: log loss,
    Brier score, calibration and written probabilities would be wrong. torchmetrics reads
    scores in [0, 1] as probabilities too; the row sums make the reading safer. One sync;
    said once a process."""
    if scores.ndim != 2 or scores.shape[1] < 2 or not scores.is_floating_point():
        return False
    if scores.numel() == 0:
        return False
    tolerance = 1e-2 if scores.dtype in (torch.float16, torch.bfloat16) else 1e-4
    low, high = torch.aminmax(scores)
    sums = scores.sum(dim=1, dtype=torch.float64)
    found = bool((low >= 0) & (high <= 1) & ((sums - 1).abs().max() <= tolerance))
    if found and not _PROBABILITIES_SAID[0]:
        _PROBABILITIES_SAID[0] = True
        logger.warning(
            "the classifier's outputs are probabilities (each row in [0, 1], summing to 1): "
            "they are scored as probabilities; training's cross-entropy takes logits (leave "
            "out a final softmax, or pass a loss_function of probabilities)"
        )
    return found


_SIGMOID_SAID = [False]


def say_if_sigmoided(scores: torch.Tensor) -> None:
    """Warn, once a process, where a binary classifier's one logit or a multi-label
    classifier's scores all lie in [0, 1], as a final sigmoid's do: they are read as logits,
    whose sigmoid is taken again (a perfect model scores near chance). Unlike a softmax's
    rows, which sum to 1, such outputs cannot be told from logits for sure, so they are not
    re-read, only said (where they spread over half of [0, 1]). One sync, on a first batch
    of at least 8 values."""
    if _SIGMOID_SAID[0] or not scores.is_floating_point() or scores.numel() < 8:
        return
    low, high = torch.aminmax(scores.detach())
    # spread over half the range: an untrained head (near 0, or a sigmoid's 0.5) says nothing
    if bool((low >= 0) & (high <= 1) & (high - low >= 0.5)):
        _SIGMOID_SAID[0] = True
        logger.warning(
            "the classifier's outputs all lie in [0, 1], as a final sigmoid's do, but a binary "
            "or multi-label classifier's outputs are read as logits (their sigmoid is taken): "
            "if the model ends in a sigmoid, leave it out (training's loss takes logits too) "
            "or pass output_transform=torch.logit"
        )


def as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is `probabilities`: their logarithms (clipped at the dtype's
    eps, as scikit-learn's log_loss clips)."""
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).eps).log()


class ConfusionMatrix:
    """Counts of (true class, predicted class) pairs; accuracy, precision, recall, F1 follow.

    `update(scores, targets)` takes `(N, C)` scores (or `(N,)` / `(N, 1)` logits of a binary
    task, thresholded at 0) and `(N,)` integer labels. Targets equal to `ignore_index` are
    skipped; other labels outside `[0, C)` are counted and reported by `compute`.
    """

    def __init__(self, num_classes: int, ignore_index: int = -100) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} is invalid: expected >= 2")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts: torch.Tensor | None = None  # flattened C*C, plus one overflow bin
        self.nan_count: torch.Tensor | None = None
        # the first label outside [0, C): [position in the stream, label], on the device
        self.first_invalid: torch.Tensor | None = None
        self.seen = 0  # samples so far (a host count, from shapes)

    def reset(self) -> None:
        self.counts = None
        self.nan_count = None
        self.first_invalid = None
        self.seen = 0

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        c = self.num_classes
        if scores.ndim == 2 and scores.shape[1] == c:
            top, predicted = scores.max(dim=1)  # a row with a NaN has a NaN maximum
        elif c == 2 and (scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1)):
            top = scores.reshape(-1)
            predicted = (top > 0).long()
        else:
            raise ValueError(
                f"classification scores of shape {tuple(scores.shape)} do not match "
                f"{c} classes; expected (N, {c})"
            )
        targets = targets.reshape(-1)
        if targets.shape[0] != predicted.shape[0]:
            raise ValueError(
                f"{predicted.shape[0]} predictions but {targets.shape[0]} targets in a batch"
            )
        if targets.is_floating_point():
            targets = targets.long()
        if self.counts is None:
            # C*C cells, then one bin for labels outside [0, C) and one for ignored targets:
            # every sample lands in a bin, so no boolean indexing (a device sync) is needed.
            self.counts = torch.zeros(c * c + 2, dtype=torch.int64, device=scores.device)
            self.nan_count = torch.zeros((), dtype=torch.int64, device=scores.device)
        ignored = targets == self.ignore_index
        outside = (targets < 0) | (targets >= c) | ignored
        spill = c * c + ignored.long()  # bin C*C: out-of-range labels; C*C+1: ignored
        index = torch.where(outside, spill, targets * c + predicted)
        if index.device.type == "cpu":
            self.counts += torch.bincount(index, minlength=c * c + 2)
        else:  # bincount would wait for the device to learn its output size
            self.counts.index_add_(0, index, torch.ones_like(index))
        assert self.nan_count is not None
        # a row with a NaN, or with +inf among several scores (their softmax is NaN; one
        # binary logit of +inf is a probability of 1)
        unreadable = torch.isnan(top)
        if scores.ndim == 2 and scores.shape[1] == c:
            unreadable |= torch.isposinf(top)
        self.nan_count += unreadable.sum()
        self._note_invalid(targets, outside & ~ignored)

    def _note_invalid(self, targets: torch.Tensor, invalid: torch.Tensor) -> None:
        """Keep the first invalid label and its position on the device (no sync), so the
        error can name it."""
        n = targets.shape[0]
        if n == 0:
            return
        if self.first_invalid is None:
            none = torch.tensor([torch.iinfo(torch.int64).max, 0], device=targets.device)
            self.first_invalid = none
        positions = torch.arange(self.seen, self.seen + n, device=targets.device)
        first = torch.where(invalid, positions, self.first_invalid[0]).min()
        label = targets[(first - self.seen).clamp(0, n - 1)].long()
        candidate = torch.stack([first, label])
        self.first_invalid = torch.where(
            first < self.first_invalid[0], candidate, self.first_invalid
        )
        self.seen += n

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another shard's counts (e.g. another rank's), as if one had seen both."""
        self.counts = _sum(self.counts, other.counts)
        self.nan_count = _sum(self.nan_count, other.nan_count)
        if self.first_invalid is None or other.first_invalid is None:
            self.first_invalid = (
                self.first_invalid if other.first_invalid is None else other.first_invalid
            )
        elif int(other.first_invalid[0]) < int(self.first_invalid[0]):
            self.first_invalid = other.first_invalid.to(self.first_invalid.device)

    def matrix(self) -> torch.Tensor:
        """The C x C matrix, rows true classes, columns predictions (scikit-learn's layout)."""
        if self.counts is None:
            raise ValueError("no data: call update() with at least one batch before compute()")
        invalid = int(self.counts[-2])
        if invalid:
            assert self.first_invalid is not None
            position, label = (int(v) for v in self.first_invalid.tolist())
            raise ValueError(
                f"{invalid} target label{'s are' if invalid > 1 else ' is'} outside the "
                f"classes [0, {self.num_classes}) and not ignore_index={self.ignore_index}; "
                f"the first: label {label} at position {position} (0-based, in the order "
                "evaluated)"
            )
        if self.nan_count is not None and int(self.nan_count):
            raise ValueError(
                f"{int(self.nan_count)} predictions contain NaN (or +inf among class scores, "
                "whose softmax is NaN): scores must be finite numbers"
            )
        return self.counts[:-2].reshape(self.num_classes, self.num_classes).cpu()

    def compute(self, average: str = "weighted") -> dict[str, float]:
        """Accuracy and precision / recall / F1 averaged as scikit-learn does.

        `weighted` weights classes by support; `macro` averages the classes that occur in
        the targets or the predictions; `micro` pools all decisions. Undefined ratios are 0.
        """
        cm = self.matrix().to(torch.float64)
        total = cm.sum()
        if total == 0:
            raise ValueError("no data: every target was ignored")
        tp = cm.diag()
        support = cm.sum(dim=1)
        predicted = cm.sum(dim=0)
        accuracy = float(tp.sum() / total)
        if average == "micro":
            return {"accuracy": accuracy, "precision": accuracy, "recall": accuracy, "f1": accuracy}
        precision, recall, f1 = _ratios(tp, predicted, support)
        if average == "weighted":
            weights = support / support.sum()
        else:
            present = (support + predicted) > 0
            weights = present.to(torch.float64) / present.sum()
        return {
            "accuracy": accuracy,
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
        }

    def per_class(self) -> list[dict[str, float]]:
        """Each class's precision, recall, F1 and support (its row of the matrix)."""
        cm = self.matrix()
        return per_label(cm.diag(), cm.sum(dim=0), cm.sum(dim=1))


class MultilabelStats:
    """Counts of a multi-label task: per label true positives, predicted and actual positives,
    and the samples, exact matches (every label right) and wrong labels.

    `update(scores, targets)` takes `(N, C)` logits and `(N, C)` 0/1 targets; a label is
    predicted when its sigmoid probability exceeds `threshold`. `compute` gives scikit-learn's
    `accuracy_score` (exact match), `hamming_loss` and precision / recall / F1 averaged over
    the labels (`macro`: every label counts, as scikit-learn does for indicator matrices;
    `weighted` by each label's support; `micro`: pooled). Undefined ratios are 0. With
    `keep_scores`, the probabilities are kept on the host (N x C floats) and scikit-learn
    adds the rank-based `roc_auc` and `average_precision`, averaged the same way (NaN, with
    scikit-learn's warning, where a label never occurs and its ROC curve is undefined).
    """

    def __init__(self, threshold: float = 0.5, keep_scores: bool = False) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} is invalid: expected a probability in (0, 1)")
        self.logit_threshold = math.log(threshold / (1.0 - threshold))
        self.keep_scores = keep_scores
        self.reset()

    def reset(self) -> None:
        self.counts: torch.Tensor | None = None  # (3, C): true positives, predicted, actual
        self.rows: torch.Tensor | None = None  # samples, exact, wrong labels, NaN rows, bad targets
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if scores.ndim != 2 or targets.shape != scores.shape:
            raise ValueError(
                f"multi-label scores of shape {tuple(scores.shape)} need 0/1 targets of the "
                f"same shape, got {tuple(targets.shape)}"
            )
        predicted = scores > self.logit_threshold
        truth = targets == 1
        if self.counts is None or self.rows is None:
            self.counts = torch.zeros(3, scores.shape[1], dtype=torch.int64, device=scores.device)
            self.rows = torch.zeros(5, dtype=torch.int64, device=scores.device)
        if self.counts.shape[1] != scores.shape[1]:
            raise ValueError(
                f"a batch has {scores.shape[1]} labels, earlier ones {self.counts.shape[1]}"
            )
        self.counts[0] += (predicted & truth).sum(0)
        self.counts[1] += predicted.sum(0)
        self.counts[2] += truth.sum(0)
        wrong = predicted != truth
        rows = self.rows  # in-place adds: no host-to-device copy, no sync
        rows[0] += scores.shape[0]
        rows[1] += (~wrong.any(1)).sum()
        rows[2] += wrong.sum()
        rows[3] += torch.isnan(scores).any(1).sum()
        rows[4] += ((targets != 0) & ~truth).sum()
        if self.keep_scores:
            self.scores.append(torch.sigmoid(scores.double()).cpu())
            self.labels.append(truth.cpu())

    def merge(self, other: MultilabelStats) -> None:
        """Add another shard's counts (e.g. another rank's), as if one had seen both."""
        self.counts = _sum(self.counts, other.counts)
        self.rows = _sum(self.rows, other.rows)
        self.scores.extend(other.scores)
        self.labels.extend(other.labels)

    def compute(self, average: str = "weighted") -> dict[str, float]:
        if self.counts is None or self.rows is None:
            raise ValueError("no data: call update() with at least one batch before compute()")
        samples, exact, wrong, nan_rows, bad = (int(v) for v in self.rows.cpu())
        if bad:
            raise ValueError(f"{bad} multi-label targets are neither 0 nor 1")
        if nan_rows:
            raise ValueError(f"{nan_rows} predictions contain NaN")
        tp, predicted, actual = self.counts.cpu().to(torch.float64)
        out = {
            "accuracy": exact / samples,
            "hamming_loss": wrong / (samples * tp.numel()),
        }
        if average == "micro":
            tp, predicted, actual = tp.sum(), predicted.sum(), actual.sum()
        precision, recall, f1 = _ratios(tp, predicted, actual)
        if average == "weighted":
            weights = _safe_divide(actual, actual.sum().expand_as(actual))
        else:  # macro: every label; micro: the one pooled "label"
            weights = torch.full_like(tp, 1.0 / tp.numel())
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            out[name] = float((values * weights).sum())
        if self.keep_scores:
            out.update(self._ranked(average))
        return out

    def per_class(self) -> list[dict[str, float]]:
        """Each label's precision, recall, F1 and support."""
        if self.counts is None:
            raise ValueError("no data: call update() with at least one batch before compute()")
        tp, predicted, actual = self.counts.cpu()
        return per_label(tp, predicted, actual)

    def _ranked(self, average: str) -> dict[str, float]:
        """ROC-AUC and average precision of the kept probabilities, by scikit-learn."""
        from sklearn.metrics import average_precision_score, roc_auc_score

        truth = torch.cat(self.labels).numpy()
        probabilities = torch.cat(self.scores).numpy()
        out = {}
        for name, score in (
            ("roc_auc", roc_auc_score),
            ("average_precision", average_precision_score),
        ):
            try:
                out[name] = float(score(truth, probabilities, average=average))
            except ValueError as error:  # e.g. a label that never occurs has no ROC curve
                raise ValueError(f"{name} is undefined here: {error}") from None
        return out


def per_label(
    tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
) -> list[dict[str, float]]:
    """Each class's (label's) precision, recall, F1 and support, as scikit-learn's
    `precision_recall_fscore_support(average=None, zero_division=0)`."""
    tp, predicted, actual = (t.to(torch.float64) for t in (tp, predicted, actual))
    ratios = (values.tolist() for values in _ratios(tp, predicted, actual))
    columns = zip(*ratios, actual.tolist(), strict=True)
    return [{"precision": p, "recall": r, "f1": f, "support": int(n)} for p, r, f, n in columns]


def _ratios(
    tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall and F1 of each class from its true positives, predicted and actual
    positives (float64 counts); an undefined ratio is 0."""
    return (
        _safe_divide(tp, predicted),
        _safe_divide(tp, actual),
        _safe_divide(2 * tp, predicted + actual),
    )


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), 0.0)


class RegressionStats:
    """Per-output running moments merged batch by batch (Chan et al.), in float64.

    Gives MSE, MAE, RMSE, R² and explained variance, averaged uniformly over outputs like
    scikit-learn's `multioutput="uniform_average"`. For a constant target, R² is 1.0 when
    the predictions are exact and 0.0 otherwise (scikit-learn's `force_finite`).

    A target that is NaN or infinite (a missing value, which a masking loss trains around) is
    left out: each output is scored over the rows whose target for it is finite, as
    scikit-learn scores that output's column with those rows dropped; one warning says how
    many were left out. An output without a finite target scores NaN.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0  # rows seen; each output's count of finite targets is state["count"]
        self.state: dict[str, torch.Tensor] = {}

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        predictions = align_regression(predictions, targets)
        dtype = _accum_dtype(predictions.device)
        y = targets.reshape(targets.shape[0], -1).to(dtype)
        p = predictions.reshape(predictions.shape[0], -1).to(dtype)
        if y.shape[0] == 0:
            return
        kept = torch.isfinite(y)
        count = kept.sum(0).to(dtype)
        y = torch.where(kept, y, 0.0)
        err = torch.where(kept, y - p, 0.0)
        batch = {"count": count, "sq": (err**2).sum(0), "abs": err.abs().sum(0)}
        for key, values in (("y", y), ("e", err)):
            mean = values.sum(0) / count.clamp(min=1)
            batch[f"{key}_mean"] = mean
            batch[f"{key}_m2"] = torch.where(kept, (values - mean) ** 2, 0.0).sum(0)
        batch["nan"] = torch.isnan(p).sum()
        batch["bad_targets"] = (~kept).sum()
        self._combine(batch, y.shape[0])

    def merge(self, other: RegressionStats) -> None:
        """Combine another shard's moments (e.g. another rank's), as if one had seen both."""
        if other.state:
            device = next(iter(self.state.values())).device if self.state else None
            state = {k: v.to(device) if device else v.clone() for k, v in other.state.items()}
            self._combine(state, other.n)

    def _combine(self, batch: dict[str, torch.Tensor], rows: int) -> None:
        self.n += rows
        if not self.state:
            self.state = batch
            return
        n, m = self.state["count"], batch["count"]
        total = n + m
        share = m / total.clamp(min=1)
        for key in ("y", "e"):
            delta = batch[f"{key}_mean"] - self.state[f"{key}_mean"]
            self.state[f"{key}_m2"] = (
                self.state[f"{key}_m2"] + batch[f"{key}_m2"] + delta**2 * n * share
            )
            self.state[f"{key}_mean"] = self.state[f"{key}_mean"] + delta * share
        for key in ("count", "sq", "abs", "nan", "bad_targets"):
            self.state[key] = self.state[key] + batch[key]

    def compute(self) -> dict[str, float]:
        if not self.state:
            raise ValueError("no data: call update() with at least one batch before compute()")
        s = {key: value.cpu() for key, value in self.state.items()}
        if int(s["nan"]):
            raise ValueError(f"{int(s['nan'])} predictions are NaN")
        if bad := int(s["bad_targets"]):
            logger.warning(
                "%s NaN or infinite: the metrics leave %s out (each output is scored over the "
                "rows whose target for it is finite)",
                f"{bad} regression targets are" if bad > 1 else "1 regression target is",
                "them" if bad > 1 else "it",
            )
        n = s["count"]
        none = n == 0  # an output without a finite target: NaN
        mse = torch.where(none, math.nan, s["sq"] / n.clamp(min=1))
        mae = torch.where(none, math.nan, s["abs"] / n.clamp(min=1))
        # R² is undefined for one sample: NaN, as scikit-learn gives; explained variance is
        # scikit-learn's 1.0 there (one residual varies by nothing)
        r2 = torch.where(n < 2, math.nan, _score_from(s["sq"], s["y_m2"]))
        explained = torch.where(none, math.nan, _score_from(s["e_m2"], s["y_m2"]))
        return {
            "mse": float(mse.mean()),
            "mae": float(mae.mean()),
            "rmse": float(mse.sqrt().mean()),
            "r2_score": float(r2.mean()),
            "explained_variance": float(explained.mean()),
        }


def _score_from(residual: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """1 - residual / total, with scikit-learn's finite values where total is 0."""
    safe = torch.where(total > 0, total, torch.ones_like(total))
    score = 1 - residual / safe
    return torch.where(total > 0, score, torch.where(residual == 0, 1.0, 0.0).to(score.dtype))


class TokenStats:
    """Language-model metrics over non-ignored tokens: loss, perplexity, token accuracy."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"generation logits of shape {tuple(logits.shape)} do not match token "
                f"targets of shape {tuple(targets.shape)}; expected (N, T, V) and (N, T)"
            )
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        flat_targets = targets.reshape(-1)
        kept = flat_targets != self.ignore_index
        nll = torch.nn.functional.cross_entropy(
            flat_logits, flat_targets, ignore_index=self.ignore_index, reduction="sum"
        )
        correct = ((flat_logits.argmax(-1) == flat_targets) & kept).sum()
        batch = {"nll": nll.double(), "tokens": kept.sum(), "correct": correct}
        self.state = _add_sums(self.state, batch)

    def merge(self, other: TokenStats) -> None:
        """Add another shard's sums (e.g. another rank's)."""
        self.state = _add_sums(self.state, other.state)

    def compute(self) -> dict[str, float]:
        if not self.state:
            raise ValueError("no data: call update() with at least one batch before compute()")
        tokens = int(self.state["tokens"])
        if tokens == 0:
            raise ValueError("no data: every target token was ignored")
        loss = float(self.state["nll"]) / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "token_accuracy": int(self.state["correct"]) / tokens,
        }


class ProbabilityStats:
    """Score-based classification metrics: log loss, top-k accuracy and, with
    `calibration_bins`, the Brier score and the expected calibration error, streamed; ROC-AUC.

    Probabilities are the softmax of `(N, C)` scores (the sigmoid of one binary logit). Log
    loss and top-k need only running sums. ROC-AUC is rank-based, so with `keep_scores` the
    probabilities are kept on the host (N x C floats) and scikit-learn computes it exactly.

    The Brier score is scikit-learn's `brier_score_loss`: the mean squared distance between
    the probabilities and the one-hot target, summed over classes (binary: of the positive
    class alone). The expected calibration error (Guo et al., 2017) bins the top label's
    probability (its confidence) into `calibration_bins` equal-width bins (b/B, (b+1)/B]
    and averages |accuracy - mean confidence| over the bins, weighted by their counts;
    `reliability()` gives the bins, for a reliability diagram.
    """

    def __init__(
        self,
        num_classes: int,
        top_k: int = 5,
        keep_scores: bool = False,
        ignore_index: int = -100,
        calibration_bins: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.top_k = top_k
        self.keep_scores = keep_scores
        self.ignore_index = ignore_index
        self.calibration_bins = calibration_bins  # 0: no Brier score or calibration error
        self.reset()

    def reset(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        # whether the scores are probabilities (a final softmax), read from the first batch
        self.given_probabilities: bool | None = None

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        targets = targets.reshape(-1).long()
        kept = (targets != self.ignore_index) & (targets >= 0) & (targets < self.num_classes)
        safe = torch.where(kept, targets, 0)
        binary = scores.ndim == 1 or scores.shape[1] == 1
        if self.given_probabilities is None and not binary:  # decided once, in its dtype
            self.given_probabilities = are_probabilities(scores)
        if not scores.is_floating_point() or scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        batch: dict[str, torch.Tensor] = {}
        if self.num_classes > self.top_k and not binary:  # on the scores as given: no new ties
            batch["top_k"] = (top_k_hits(scores, safe, self.top_k) & kept).sum()
        if binary:
            logit = scores.reshape(-1)
            nll = -F.logsigmoid(torch.where(safe == 1, logit, -logit))
        else:
            if self.given_probabilities:  # a model ending in a softmax
                scores = as_logits(scores)
            # -log softmax(scores)[y] = logsumexp(scores) - scores[y]: no C-wide output
            picked = scores.gather(1, safe[:, None]).squeeze(1)
            nll = torch.logsumexp(scores, dim=1) - picked
        batch["nll"] = (nll.to(_accum_dtype(scores.device)) * kept).sum()
        batch["count"] = kept.sum()
        if self.calibration_bins:
            batch.update(self._calibration(scores, safe, kept))
        self.state = _add_sums(self.state, batch)
        if self.keep_scores:
            self.scores.append(class_probabilities(scores.double(), detect=False).cpu())
            self.labels.append(torch.where(kept, targets, -1).cpu())

    def _calibration(
        self, scores: torch.Tensor, safe: torch.Tensor, kept: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The batch's Brier sum and per-bin counts, confidence and correct sums (no sync:
        fixed-size scatter-adds, no boolean indexing)."""
        dtype = _accum_dtype(scores.device)
        probabilities = class_probabilities(scores.to(dtype), detect=False)
        one_hot = F.one_hot(safe, probabilities.shape[1]).to(dtype)
        weight = kept.to(dtype)
        brier = ((probabilities - one_hot) ** 2).sum(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        bins = self.calibration_bins
        which = (confidence * bins).ceil().long().clamp(1, bins) - 1
        zeros = torch.zeros(bins, dtype=dtype, device=scores.device)
        return {
            "brier": (brier * weight).sum(),
            "bin_count": zeros.scatter_add(0, which, weight),
            "bin_confidence": zeros.scatter_add(0, which, confidence * weight),
            "bin_correct": zeros.scatter_add(0, which, (predicted == safe).to(dtype) * weight),
        }

    def reliability(self) -> dict[str, list[float]]:
        """Per confidence bin: its upper edge, sample count, mean confidence and accuracy."""
        bins = self.calibration_bins
        count = self.state["bin_count"].double().cpu()
        seen = count.clamp(min=1)
        return {
            "upper_edge": [(b + 1) / bins for b in range(bins)],
            "count": count.tolist(),
            "confidence": (self.state["bin_confidence"].double().cpu() / seen).tolist(),
            "accuracy": (self.state["bin_correct"].double().cpu() / seen).tolist(),
        }

    def merge(self, other: ProbabilityStats) -> None:
        """Add another shard's sums and kept scores (e.g. another rank's)."""
        self.state = _add_sums(self.state, other.state)
        self.scores.extend(other.scores)
        self.labels.extend(other.labels)

    def compute(self, average: str = "weighted") -> dict[str, float]:
        """The probability metrics; a multi-class `roc_auc` averages its one-vs-rest scores
        as `average` says (scikit-learn's `average`), as precision, recall and F1 do."""
        if not self.state:
            raise ValueError("no data: call update() with at least one batch before compute()")
        count = int(self.state["count"])
        if count == 0:
            raise ValueError("no data: every target was ignored")
        out = {"log_loss": float(self.state["nll"]) / count}
        if "top_k" in self.state:
            out["top_k_accuracy"] = int(self.state["top_k"]) / count
        if "brier" in self.state:
            brier = float(self.state["brier"]) / count
            out["brier_score"] = brier / 2 if self.num_classes == 2 else brier
            gaps = (self.state["bin_correct"] - self.state["bin_confidence"]).abs()
            out["ece"] = float(gaps.sum()) / count
        if self.keep_scores:
            out["roc_auc"] = self.roc_auc(average)
        return out

    def roc_auc(self, average: str = "weighted") -> float:
        """ROC-AUC as scikit-learn computes it: binary, or one-vs-rest for C > 2 averaged
        over the classes as `average` says."""
        from sklearn.metrics import roc_auc_score

        labels = torch.cat(self.labels).numpy()
        probabilities = torch.cat(self.scores).numpy()
        kept = labels >= 0
        labels, probabilities = labels[kept], probabilities[kept]
        try:
            if self.num_classes == 2:
                return float(roc_auc_score(labels, probabilities[:, 1]))
            return float(
                roc_auc_score(
                    labels,
                    probabilities,
                    multi_class="ovr",
                    average=average,
                    labels=range(self.num_classes),
                )
            )
        except ValueError as error:
            raise ValueError(f"roc_auc is undefined here: {error}") from None

    def curve(self) -> tuple[Any, Any]:
        """The binary ROC curve (false and true positive rates), for plotting."""
        from sklearn.metrics import roc_curve

        labels = torch.cat(self.labels).numpy()
        probabilities = torch.cat(self.scores).numpy()
        kept = labels >= 0
        fpr, tpr, _ = roc_curve(labels[kept], probabilities[kept][:, 1])
        return fpr, tpr


def top_k_hits(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each row's target class is among its k top scores, ties ranked as
    scikit-learn's `top_k_accuracy_score` ranks them (a stable sort, reversed: of tied
    classes the higher index ranks first), so tied scores are not all hits: the target's
    rank is the classes scoring higher plus the tied classes of a higher index."""
    picked = scores.gather(1, targets[:, None])
    classes = torch.arange(scores.shape[1], device=scores.device)
    tied_before = (scores == picked) & (classes[None, :] > targets[:, None])
    return ((scores > picked) | tied_before).sum(dim=1) < k


def _sum(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
    """Two shards' counts added (either may be missing: a shard that saw no batch)."""
    if theirs is None:
        return mine
    if mine is None:
        return theirs.clone()
    return mine + theirs.to(mine.device)


def _add_sums(
    state: dict[str, torch.Tensor], more: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Key-wise sums of two running-sum states (either may be empty)."""
    if not more:
        return state
    if not state:
        return dict(more)
    return {key: state[key] + more[key].to(state[key].device) for key in more}
