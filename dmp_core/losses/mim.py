"""MIM: regression of the masked patches of ``F(masked image, text)`` onto a target of the
clean image (METHOD.md 3.2 and 4.1). Only masked patches contribute."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mim_loss(pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``pred``/``target`` [B, N, D], ``patch_mask`` [B, N] (True = masked); fp32.

    - ``hog``: MSE, mean over masked patches and dims (MaskFeat);
    - ``pixel``: L1 on masked pixels (SimMIM);
    - ``momentum``: L1 between L2-normalised prediction and target features (MAMO).
    """
    sel = patch_mask.bool()
    pred, target = pred[sel].float(), target[sel].float().detach()
    if pred.numel() == 0:
        return pred.sum() * 0.0
    if kind == "hog":
        return F.mse_loss(pred, target)
    if kind == "pixel":
        return F.l1_loss(pred, target)
    if kind == "momentum":
        return F.l1_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1))
    raise ValueError(f"objective.mim_target: unknown target {kind!r}")
