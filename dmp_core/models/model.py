"""DMPModel: image tower + text tower + merged fusion + retrieval, MLM and MIM heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from dmp_core.models.fusion import MergedFusion
from dmp_core.models.heads import MLMHead, bert_init
from dmp_core.models.text import TextTower
from dmp_core.models.cnn import CNNTower
from dmp_core.models.vision import VisionTower

TEMP_INIT, TEMP_MIN, TEMP_MAX = 0.07, 0.001, 0.5
ITM_STATES = ("text_cls", "text_mean", "text_cls_mean", "fusion_cls", "concat")


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (``attention_mask`` 1) of ``states`` [B, L, D] -> [B, D]."""
    keep = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class DMPModel(nn.Module):
    """The model API of docs/ARCHITECTURE.md. Images enter as uint8 and go through
    ``preprocess`` (the image tower's normalisation); texts as WordPiece ids + 0/1 mask.

    ``itm_state`` names the fused pair state the ITM head reads (:data:`ITM_STATES`):
    ``text_cls`` (the fused text [CLS], ALBEF/BLIP), ``text_mean`` (the masked mean of the
    fused text tokens: every word's view of the image), ``text_cls_mean`` (both,
    concatenated), ``fusion_cls`` (the fusion [CLS] query) or ``concat`` (fusion [CLS] and
    fused text [CLS]);
    ``itm_head`` is ``linear`` (ALBEF) or ``mlp`` (Linear-GELU-Linear).
    ``mim_dim`` builds the MIM head (one linear layer on joint patch states, SimMIM's
    "lightweight head") when the pretraining objective has MIM; it lives in the model so
    that evaluation can measure whether MIM uses the text (the text-use gap)."""

    def __init__(self, vision: VisionTower | CNNTower, text: TextTower, fusion: MergedFusion, bert_config: BertConfig,
                 *, embed_dim: int, mean: tuple[float, ...], std: tuple[float, ...], preset: str,
                 itm_state: str = "text_cls", itm_head: str = "mlp", mim_dim: Optional[int] = None,
                 text_pool: str = "cls") -> None:
        super().__init__()
        if itm_state not in ITM_STATES:
            raise ValueError(f"model.itm_state: unknown state {itm_state!r}")
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"model.text_pool: unknown pooling {text_pool!r}")
        self.text_pool = text_pool
        self.preset = preset
        self.itm_state = itm_state
        self.vision, self.text, self.fusion = vision, text, fusion
        self.image_dim, self.text_dim, self.embed_dim = vision.width, text.width, embed_dim
        self.vocab_size = bert_config.vocab_size
        self.image_proj = nn.Linear(self.image_dim, embed_dim)
        self.text_proj = nn.Linear(self.text_dim, embed_dim)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        pair_dim = self.text_dim * (2 if itm_state in ("concat", "text_cls_mean") else 1)
        if itm_head == "linear":
            self.itm_head: nn.Module = nn.Linear(pair_dim, 2)
        elif itm_head == "mlp":
            self.itm_head = nn.Sequential(nn.Linear(pair_dim, pair_dim), nn.GELU(), nn.Linear(pair_dim, 2))
        else:
            raise ValueError(f"model.itm_head: unknown head {itm_head!r}")
        self.mlm_head = MLMHead(bert_config)
        self.mim_head = nn.Linear(self.text_dim, mim_dim) if mim_dim else None
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # every fresh module gets BERT's N(0, 0.02) init (the towers keep theirs)
        for module in (self.image_proj, self.text_proj, self.itm_head, self.mlm_head, self.mim_head,
                       self.fusion.image_proj, self.fusion.type_embeddings):
            if module is not None:
                bert_init(module)
        if self.fusion.cls is not None:
            nn.init.normal_(self.fusion.cls, std=0.02)
        # the residual re-ranking head (dmp_core.losses.rerank): an MLP on the pair state plus a
        # weight on the ITM margin, both starting at zero, so the re-ranked order starts as ITC's
        self.rank_head = bert_init(nn.Sequential(nn.Linear(pair_dim, pair_dim), nn.GELU(), nn.Linear(pair_dim, 1)))
        nn.init.zeros_(self.rank_head[-1].weight)
        nn.init.zeros_(self.rank_head[-1].bias)
        self.rank_margin_weight = nn.Parameter(torch.zeros(()))

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def mask_block(self) -> int:
        """MIM masks square blocks of this many patches per side (ViT: 2; CNN: 1)."""
        return self.vision.mask_block

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.vision.grid_size

    @property
    def layout(self):
        """Where patches and tokens sit in the fused sequence (:class:`JointLayout`)."""
        return self.fusion.layout

    # ------------------------------------------------------------------ temperature
    @property
    def temperature(self) -> torch.Tensor:
        """The ITC temperature. It is clamped *in place* after each optimiser step
        (:meth:`clamp_temperature_`, as ALBEF), not here, so its gradient never vanishes."""
        return self.temp

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay besides biases and norms: CLS,
        mask, position and type tokens, and the temperature."""
        names = {"temp", "rank_margin_weight"}
        names |= {f"vision.{n}" for n in self.vision.no_weight_decay()}
        names |= {f"fusion.{n}" for n in self.fusion.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

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

    def text_features(self, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised ITC projection of the caption: its [CLS] state, or (``text_pool``
        mean) the mean of its real token states (padding excluded)."""
        if self.text_pool == "cls":
            return self.text_proj(text_states[:, 0])
        return self.text_proj(masked_mean(text_states, attention_mask))

    def image_embed(self, image_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(image_states).float(), dim=-1)

    def text_embed(self, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_features(text_states, attention_mask).float(), dim=-1)

    @property
    def pair_state_dim(self) -> int:
        """Width of :meth:`pair_state`, the input of the ITM and re-ranking heads."""
        return self.rank_head[0].in_features

    def pair_state(self, joint: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The fused pair state [B, D] (or [B, 2D] for ``concat`` / ``text_cls_mean``) read
        by the ITM head; ``attention_mask`` [B, L] marks the real text tokens of ``joint``."""
        tokens = self.layout.tokens(joint)
        state = self.itm_state
        if state == "text_cls":
            return tokens[:, 0]
        if state == "text_mean":
            return masked_mean(tokens, attention_mask)
        if state == "text_cls_mean":
            return torch.cat([tokens[:, 0], masked_mean(tokens, attention_mask)], dim=-1)
        if state == "fusion_cls":
            return joint[:, 0]
        return torch.cat([joint[:, 0], tokens[:, 0]], dim=-1)

    def itm_logits(self, joint: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """J [B, S, Dt] (+ the text mask [B, L]) -> [B, 2]; column 1 is the match logit."""
        return self.itm_head(self.pair_state(joint, attention_mask))

    def pair_scores(self, joint: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ITM margin ``l1 - l0`` [B], residual correction r [B]) from one pair state. The
        margin is the seed's score (binary cross-entropy fixes only this difference, not l1
        alone). ``r`` is
        the re-ranking head's output plus a learned weight on the (detached) margin: the
        correction the listwise loss adds to ``ITC similarity / tau`` (:mod:`dmp_core.losses.rerank`)."""
        state = self.pair_state(joint, attention_mask)
        logits = self.itm_head(state)
        margin = logits[:, 1] - logits[:, 0]
        residual = self.rank_head(state).squeeze(-1) + self.rank_margin_weight * margin.detach()
        return margin, residual

    def mlm_logits(self, token_states: torch.Tensor) -> torch.Tensor:
        """Joint (or text) token states [..., Dt] -> vocabulary logits [..., V]."""
        return self.mlm_head(token_states, self.text.embeddings.word_embeddings.weight)

    def mim_predictions(self, joint: torch.Tensor) -> torch.Tensor:
        """J -> MIM predictions at every patch [B, N, mim_dim] (the loss keeps masked ones)."""
        if self.mim_head is None:
            raise ValueError(f"model preset {self.preset}: built without a MIM head (objective has no MIM)")
        return self.mim_head(self.layout.patches(joint))

    def parameter_counts(self) -> dict[str, int]:
        def count(*modules: Optional[nn.Module]) -> int:
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        heads = (count(self.image_proj, self.text_proj, self.itm_head, self.rank_head, self.mlm_head, self.mim_head)
                 + self.temp.numel() + self.rank_margin_weight.numel())
        parts = {"image_tower": count(self.vision), "text_tower": count(self.text),
                 "fusion": count(self.fusion), "heads": heads}
        parts["total"] = count(self)
        return parts
