"""Heads. The model carries the retrieval heads (ITC projections, ITM) and the MLM head
(its decoder is tied to the word embeddings); the pretraining-only heads (MIM head, MRM
predictor, VICReg expanders) are built by the Pretrainer from the objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


class MLMHead(nn.Module):
    """BERT's prediction head (dense-gelu-LayerNorm) with the decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """``word_embeddings`` is the text tower's embedding matrix (the tied decoder)."""
        return F.linear(self.transform(states), word_embeddings, self.bias)


def mlp_expander(in_dim: int, width: int) -> nn.Sequential:
    """VICReg expander: (Linear-BN-ReLU) x 2 + Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width),
    )


def mrm_predictor(width: int) -> nn.Sequential:
    """MAMO's small MLP predictor on joint states."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width))
