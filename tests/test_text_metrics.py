"""BLEU and ROUGE-L against sacrebleu and Google's rouge-score."""

from __future__ import annotations

import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from traineval import Evaluator
from traineval.evaluation.text import TextStats

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "rug",
    "quickly",
    "slowly",
    "and",
    "then",
]


def _corpus(seed: int, n: int = 60):
    rng = random.Random(seed)
    references, hypotheses = [], []
    for _ in range(n):
        reference = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        hypothesis = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in reference]
        if rng.random() < 0.3:
            hypothesis = hypothesis[: rng.randint(2, len(hypothesis))]
        references.append(" ".join(reference))
        hypotheses.append(" ".join(hypothesis))
    return hypotheses, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_bleu_equals_sacrebleu(seed):
    hypotheses, references = _corpus(seed)
    stats = TextStats()
    for start in range(0, len(hypotheses), 7):
        stats.update(hypotheses[start : start + 7], references[start : start + 7])
    expected = sacrebleu.corpus_bleu(
        hypotheses, [references], tokenize="none", smooth_method="none"
    ).score
    assert stats.compute()["bleu"] * 100 == pytest.approx(expected, rel=1e-9)


def test_bleu_with_several_references_equals_sacrebleu():
    hypotheses, first = _corpus(3, 30)
    _, second = _corpus(4, 30)
    stats = TextStats()
    stats.update(hypotheses, [[a, b] for a, b in zip(first, second, strict=True)])
    expected = sacrebleu.corpus_bleu(
        hypotheses, [first, second], tokenize="none", smooth_method="none"
    ).score
    assert stats.compute()["bleu"] * 100 == pytest.approx(expected, rel=1e-9)


def test_rouge_l_equals_rouge_score():
    hypotheses, references = _corpus(5)
    hypotheses[0] = "The CAT, sat!"  # punctuation and case handled as rouge-score does
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(
        scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)
    ) / len(hypotheses)
    result = Evaluator().compute_text_metrics(hypotheses, references)
    assert result["rouge_l"] == pytest.approx(expected, rel=1e-12)


def test_text_metric_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        TextStats().update(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no data"):
        TextStats().compute()


def test_evaluate_model_decodes_generation_outputs():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    vocabulary = ["<pad>", "the", "cat", "sat", "on", "mat"]
    targets = torch.tensor([[1, 2, 3, 4, 1, 5], [1, 2, 3, -100, -100, -100]])
    logits = torch.nn.functional.one_hot(targets.clamp(min=0), 6).float() * 5
    logits[1, 2] = torch.nn.functional.one_hot(torch.tensor(5), 6).float() * 5  # one wrong token

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, index):
            return logits[index] * self.scale

    def decode(ids):
        return " ".join(vocabulary[i] for i in ids)

    loader = DataLoader(TensorDataset(torch.arange(2), targets), batch_size=1)
    result = Evaluator().evaluate_model(Fixed(), loader, decode=decode)
    expected = TextStats()
    expected.update(
        ["the cat sat on the mat", "the cat mat"], ["the cat sat on the mat", "the cat sat"]
    )
    assert result["bleu"] == pytest.approx(expected.compute()["bleu"])
    assert result["rouge_l"] == pytest.approx(expected.compute()["rouge_l"])
    assert result["token_accuracy"] == pytest.approx(8 / 9)
