"""DMPModel: image tower + text tower + merged fusion + retrieval and MLM heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from dmp_core.models.fusion import MergedFusion
from dmp_core.models.heads import MLMHead
from dmp_core.models.text import TextTower
from dmp_core.models.vision import VisionTower

TEMP_INIT, TEMP_MIN, TEMP_MAX = 0.07, 0.001, 0.5


class DMPModel(nn.Module):
    """The model API of docs/ARCHITECTURE.md. Images enter as uint8 and go through
    ``preprocess`` (the image tower's normalisation); texts as WordPiece ids + 0/1 mask."""

    def __init__(self, vision: VisionTower, text: TextTower, fusion: MergedFusion, bert_config: BertConfig,
                 *, embed_dim: int, mean: tuple[float, ...], std: tuple[float, ...], preset: str) -> None:
        super().__init__()
        self.preset = preset
        self.vision, self.text, self.fusion = vision, text, fusion
        self.image_dim, self.text_dim, self.embed_dim = vision.width, text.width, embed_dim
        self.vocab_size = bert_config.vocab_size
        self.image_proj = nn.Linear(self.image_dim, embed_dim)
        self.text_proj = nn.Linear(self.text_dim, embed_dim)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        self.itm_head = nn.Linear(self.text_dim, 2)
        self.mlm_head = MLMHead(bert_config)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vision.grid_size

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)

    # ------------------------------------------------------------------ encoders
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (0..255) -> float, normalised with the image tower's mean/std."""
        images = images.to(self.pixel_mean.device, non_blocking=True).float().div_(255.0)
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> [B, 1+N, Dv]; masked patches get the mask token."""
        return self.vision(images, patch_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, attention_mask)

    def fuse(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fusion(image_states, text_states, attention_mask)

    # ------------------------------------------------------------------ heads
    def image_features(self, image_states: torch.Tensor) -> torch.Tensor:
        """Unnormalised ITC projection of the image CLS (VICReg's representation)."""
        return self.image_proj(image_states[:, 0])

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.text_proj(text_states[:, 0])

    def image_embed(self, image_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(image_states).float(), dim=-1)

    def text_embed(self, text_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_features(text_states).float(), dim=-1)

    def itm_logits(self, joint: torch.Tensor) -> torch.Tensor:
        """J [B, S, Dt] -> [B, 2]; column 1 is the match logit."""
        return self.itm_head(joint[:, 0])

    def mlm_logits(self, token_states: torch.Tensor) -> torch.Tensor:
        """Joint (or text) token states [..., Dt] -> vocabulary logits [..., V]."""
        return self.mlm_head(token_states, self.text.embeddings.word_embeddings.weight)

    def parameter_counts(self) -> dict[str, int]:
        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        heads = count(self.image_proj, self.text_proj, self.itm_head, self.mlm_head) + self.temp.numel()
        parts = {"image_tower": count(self.vision), "text_tower": count(self.text),
                 "fusion": count(self.fusion), "heads": heads}
        parts["total"] = count(self)
        return parts
