"""Image tower: a timm VisionTransformer run piece by piece so that masked patches can
be replaced by a learned mask token *before* the position embeddings (SimMIM)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from dmp_core.config import ParamsError


def _pretrained_kwargs(source: Optional[str], local: Optional[str]) -> dict[str, Any]:
    """timm.create_model kwargs for the weights: a local dir/file overrides the registry tag."""
    if local is None:
        return {"pretrained": source is not None}
    path = Path(local)
    if not path.exists():
        raise ParamsError(f"model.image_weights: {local} does not exist")
    if path.is_dir():  # a directory in the hub layout (config.json + model.safetensors)
        return {"pretrained": True, "pretrained_cfg_overlay": {"source": "local-dir", "file": str(path)}}
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def pixel_mask(patch_mask: torch.Tensor, grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """[B, N] row-major patch mask -> [B, 1, H, W] pixel mask (each patch a ``patch_size`` square)."""
    gh, gw = grid_size
    grid = patch_mask.reshape(-1, 1, gh, gw).float()
    return grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


class VisionTower(nn.Module):
    """``forward(images, patch_mask=None) -> [B, 1+N, D]`` (CLS first, row-major patches).

    ``masking="token"`` swaps masked patch embeddings for ``mask_token`` before the position
    embeddings are added; ``masking="zero"`` (the seed's choice) zeroes the masked pixels.
    """

    def __init__(self, spec: dict[str, Any], *, image_size: int, pretrained: bool,
                 weights: Optional[str] = None, drop_path: float = 0.0, masking: str = "token") -> None:
        super().__init__()
        source = spec.get("pretrained") if pretrained else None
        load = _pretrained_kwargs(source, weights if pretrained else None)
        name = source if (load["pretrained"] and source and weights is None) else spec["arch"]
        try:
            self.vit = timm.create_model(
                name, img_size=image_size, patch_size=spec["patch_size"], num_classes=0, global_pool="",
                drop_path_rate=drop_path, **spec.get("overrides", {}), **load,
            )
        except (OSError, RuntimeError, ValueError) as err:  # missing/mismatched weights, no network
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ParamsError(f"model image tower: cannot build {name!r} with weights {weights or source} ({first})") from None
        if self.vit.num_prefix_tokens != 1 or self.vit.cls_token is None:
            raise ParamsError(f"model image tower {name}: expected exactly one CLS prefix token")
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.grid_size = tuple(int(g) for g in self.vit.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.width = int(self.vit.embed_dim)
        self.masking = masking
        self.mask_block = int(spec.get("mask_block", 2))  # MIM masks blocks of 2 x 2 patches (SimMIM's 32 px)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's pretrained config of the tower (mean, std, interpolation)."""
        return self.vit.pretrained_cfg

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay: timm's own
        list (position embedding, CLS token) and the mask token."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token"}

    def forward(self, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        vit = self.vit
        if patch_mask is not None and self.masking == "zero":
            images = images * (1.0 - self._pixel_mask(patch_mask).to(images.dtype))
            patch_mask = None
        x = vit.patch_embed(images)  # [B, N, D]
        if patch_mask is not None:
            keep = (~patch_mask.bool()).unsqueeze(-1).to(x.dtype)
            x = x * keep + self.mask_token.to(x.dtype) * (1.0 - keep)
        x = vit._pos_embed(x)  # CLS + position embeddings
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def _pixel_mask(self, patch_mask: torch.Tensor) -> torch.Tensor:
        return pixel_mask(patch_mask, self.grid_size, self.patch_size)
