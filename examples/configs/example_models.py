"""Model factories for examples/configs/custom_model.yaml and huggingface.yaml."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def residual_mlp(input_shape: tuple[int, ...], output_dim: int, width: int = 64, blocks: int = 2):
    """An MLP with residual blocks: (features,) -> output_dim logits."""
    return nn.Sequential(
        nn.Linear(input_shape[0], width),
        *(Residual(width) for _ in range(blocks)),
        nn.Linear(width, output_dim),
    )


def tiny_bert(input_shape: tuple[int, ...], output_dim: int, hidden: int = 32):
    """A small BERT classifier built from a config (no download) over binned features: each
    of the table's columns becomes a token. Its forward returns a Hugging Face ModelOutput,
    which traineval reads by its logits."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max(64, input_shape[0]),
        num_labels=output_dim,
    )
    bert = BertForSequenceClassification(config)

    class Tokens(nn.Module):
        """Standardised features -> token ids (16 bins), then the BERT classifier."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, x: torch.Tensor):
            ids = torch.bucketize(x, torch.linspace(-2, 2, 15, device=x.device))
            return self.bert(input_ids=ids)

    return Tokens()
