"""Merged-attention fusion: the second half of the BERT run over one sequence
``[fusion CLS?; P(image CLS)?; P(image patches); text tokens]`` (METHOD.md section 1).

Plain self-attention over the joint sequence (no new attention weights), with learned
modality-type embeddings and an *additive* padding mask. The two optional prefix tokens:

* the fusion [CLS], a learned query (``fusion_cls``): needed only when the ITM head
  reads it (``model.itm_state`` fusion_cls / concat). Its first-layer attention cannot
  depend on the text, and in from-scratch runs an ITM head on it sat at the 1:2 class
  prior from the first step, so the default ITM state is the fused text [CLS] (ALBEF);
* the image tower's [CLS] state (``image_cls``), which gives every text token one
  summary of the image to attend to besides the patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from dmp_core.models.text import additive_mask

CLS_TYPE, IMAGE_TYPE, TEXT_TYPE = 0, 1, 2


@dataclass(frozen=True)
class JointLayout:
    """Where each part sits in the fused sequence J [B, S, D]."""

    fusion_cls: bool
    image_cls: bool
    num_patches: int

    @property
    def patch_start(self) -> int:
        return int(self.fusion_cls) + int(self.image_cls)

    @property
    def text_start(self) -> int:
        return self.patch_start + self.num_patches

    def patches(self, joint: torch.Tensor) -> torch.Tensor:
        """The joint patch states [B, N, D] (MIM, MRM)."""
        return joint[:, self.patch_start:self.text_start]

    def tokens(self, joint: torch.Tensor) -> torch.Tensor:
        """The joint text-token states [B, L, D] (MLM, MRM); index 0 is the fused text [CLS]."""
        return joint[:, self.text_start:]


class MergedFusion(nn.Module):
    """``forward(image_states [B,1+N,Dv], text_states [B,L,Dt], attention_mask [B,L]) -> J``."""

    def __init__(self, layers: list[BertLayer], image_width: int, text_width: int, num_patches: int, *,
                 fusion_cls: bool, image_cls: bool, eps: float = 1e-12) -> None:
        super().__init__()
        self.layout = JointLayout(fusion_cls=fusion_cls, image_cls=image_cls, num_patches=num_patches)
        self.image_proj = nn.Sequential(nn.Linear(image_width, text_width), nn.LayerNorm(text_width, eps=eps))
        self.cls = nn.Parameter(torch.zeros(1, 1, text_width)) if fusion_cls else None
        self.type_embeddings = nn.Embedding(3, text_width)  # fusion CLS / image / text
        self.layers = nn.ModuleList(layers)

    def no_weight_decay(self) -> set[str]:
        names = {"type_embeddings.weight"}
        return names | ({"cls"} if self.cls is not None else set())

    def forward(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = text_states.shape[0]
        types = self.type_embeddings.weight
        image = image_states if self.layout.image_cls else image_states[:, 1:]
        parts = []
        if self.cls is not None:
            parts.append((self.cls + types[CLS_TYPE]).expand(batch, -1, -1).to(text_states.dtype))
        parts.append((self.image_proj(image) + types[IMAGE_TYPE]).to(text_states.dtype))
        parts.append(text_states + types[TEXT_TYPE])
        x = torch.cat(parts, dim=1)
        n_prefix = x.shape[1] - text_states.shape[1]
        keep = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
        mask = additive_mask(keep, x.dtype)
        for layer in self.layers:
            x = layer(x, attention_mask=mask)
        return x
