"""BLEU and ROUGE-L of decoded texts, streamed: both need only running sums.

Corpus BLEU (Papineni et al.) sums clipped n-gram matches, n-gram totals and lengths over
the corpus, so its state is a few integers. ROUGE-L here is the mean over sentence pairs
of the LCS F-measure, like `rouge-score`'s `rougeL`. Tokens are whitespace-separated for
BLEU (tokenize your text first, as `sacrebleu --tokenize none` expects) and rouge-score's
lower-cased alphanumeric words for ROUGE-L.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


class TextStats:
    """Streaming corpus BLEU-4 and mean ROUGE-L F-measure.

    Example:
        >>> stats = TextStats()
        >>> stats.update(["the cat sat on the mat"], ["the cat sat on the mat"])
        >>> stats.compute()
        {'bleu': 1.0, 'rouge_l': 1.0}
    """

    def __init__(self, max_order: int = 4) -> None:
        self.max_order = max_order
        self.matches = [0] * max_order
        self.totals = [0] * max_order
        self.hypothesis_length = 0
        self.reference_length = 0
        self.rouge_sum = 0.0
        self.pairs = 0

    def update(
        self, hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
    ) -> None:
        """Add hypothesis texts and their reference text (or list of references) each."""
        if len(hypotheses) != len(references):
            raise ValueError(
                f"{len(hypotheses)} hypotheses but {len(references)} references in a batch"
            )
        for hypothesis, refs in zip(hypotheses, references, strict=True):
            candidates = [refs] if isinstance(refs, str) else list(refs)
            if not candidates:
                raise ValueError("every hypothesis needs at least one reference text")
            self._bleu(hypothesis.split(), [r.split() for r in candidates])
            self.rouge_sum += max(_rouge_l(hypothesis, r) for r in candidates)
            self.pairs += 1

    def _bleu(self, hypothesis: list[str], references: list[list[str]]) -> None:
        length = len(hypothesis)
        self.hypothesis_length += length
        # the closest reference length; the shorter one on a tie (as sacrebleu)
        self.reference_length += min((abs(len(r) - length), len(r)) for r in references)[1]
        for n in range(1, self.max_order + 1):
            counts = _ngrams(hypothesis, n)
            best: Counter[tuple[str, ...]] = Counter()
            for reference in references:
                best |= _ngrams(reference, n)
            self.matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            self.totals[n - 1] += max(0, length - n + 1)

    def merge(self, other: TextStats) -> None:
        """Add another shard's counts (e.g. another rank's)."""
        self.matches = [a + b for a, b in zip(self.matches, other.matches, strict=True)]
        self.totals = [a + b for a, b in zip(self.totals, other.totals, strict=True)]
        self.hypothesis_length += other.hypothesis_length
        self.reference_length += other.reference_length
        self.rouge_sum += other.rouge_sum
        self.pairs += other.pairs

    def compute(self) -> dict[str, float]:
        if self.pairs == 0:
            raise ValueError("no data: call update() with at least one text before compute()")
        if min(self.matches) == 0:
            bleu = 0.0
        else:
            log_precision = (
                sum(math.log(m / t) for m, t in zip(self.matches, self.totals, strict=True))
                / self.max_order
            )
            ratio = self.hypothesis_length / max(self.reference_length, 1)
            brevity = 1.0 if ratio > 1 else math.exp(1 - 1 / ratio) if ratio > 0 else 0.0
            bleu = brevity * math.exp(log_precision)
        return {"bleu": bleu, "rouge_l": self.rouge_sum / self.pairs}


def _rouge_l(hypothesis: str, reference: str) -> float:
    h = _ROUGE_TOKEN.sub(" ", hypothesis.lower()).split()
    r = _ROUGE_TOKEN.sub(" ", reference.lower()).split()
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
