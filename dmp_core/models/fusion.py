"""Merged-attention fusion: the second half of the BERT run over one sequence
``[fusion CLS; P(image patches); text tokens]`` (METHOD.md section 1)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from dmp_core.models.text import additive_mask

CLS_TYPE, IMAGE_TYPE, TEXT_TYPE = 0, 1, 2


class MergedFusion(nn.Module):
    """``forward(image_states [B,1+N,Dv], text_states [B,L,Dt], attention_mask [B,L]) -> J [B,1+N+L,Dt]``.

    J[:, 0] is the pair state (ITM), J[:, 1:1+N] the joint patch states (MIM, MRM),
    J[:, 1+N:] the joint token states (MLM, MRM). The image CLS is not part of the sequence.
    """

    def __init__(self, layers: list[BertLayer], image_width: int, text_width: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.image_proj = nn.Sequential(nn.Linear(image_width, text_width), nn.LayerNorm(text_width, eps=eps))
        self.cls = nn.Parameter(torch.zeros(1, 1, text_width))
        self.type_embeddings = nn.Embedding(3, text_width)  # fusion CLS / image / text
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.type_embeddings.weight, std=0.02)
        self.layers = nn.ModuleList(layers)

    def forward(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = text_states.shape[0]
        types = self.type_embeddings.weight
        cls = (self.cls + types[CLS_TYPE]).expand(batch, -1, -1)
        patches = self.image_proj(image_states[:, 1:]) + types[IMAGE_TYPE]
        x = torch.cat([cls, patches.to(text_states.dtype), text_states + types[TEXT_TYPE]], dim=1)
        keep = torch.cat([attention_mask.new_ones(batch, 1 + patches.shape[1]), attention_mask], dim=1)
        mask = additive_mask(keep, x.dtype)
        for layer in self.layers:
            x = layer(x, attention_mask=mask)
        return x
