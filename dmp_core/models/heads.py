"""Heads. The model carries the retrieval heads (ITC projections, ITM), the MLM head (its
decoder is tied to the word embeddings) and the MIM head; the pretraining-only heads (MRM
predictor, VICReg expanders) are built by the Pretrainer from the objective. Every fresh
head gets BERT's N(0, 0.02) initialisation (:func:`bert_init`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


def bert_init(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT's initialisation, in place, for every submodule: Linear and Embedding weights
    N(0, std), biases 0, LayerNorm weight 1 and bias 0 (BatchNorm keeps its own)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters(recurse=False):
        if name == "bias":  # MLMHead's output bias
            nn.init.zeros_(p)
    return module


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
    """VICReg expander: (Linear-BN-ReLU) x 2 + Linear (BERT init)."""
    return bert_init(nn.Sequential(
        nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width),
    ))


def mrm_predictor(width: int) -> nn.Sequential:
    """MAMO's small MLP predictor on joint states (BERT init)."""
    return bert_init(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width)))
