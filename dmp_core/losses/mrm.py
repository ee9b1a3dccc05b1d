"""MRM: MAMO's implicit target. The predictor's output on masked positions regresses the
EMA model's fused states of the clean pair, normalised per token (layer-norm without
affine) and stop-gradient. The target does NOT pass through the online predictor (the
seed did, and its MRM loss collapsed to ~0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mrm_targets(ema_states: torch.Tensor) -> torch.Tensor:
    """Per-token layer-norm without affine, detached, fp32."""
    states = ema_states.detach().float()
    return F.layer_norm(states, states.shape[-1:])


def mrm_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """L2 (mean squared error) at the masked positions; plus the targets' std per dimension
    (mean over dims) as a collapse diagnostic. ``target`` must come from :func:`mrm_targets`."""
    sel = mask.bool()
    p, t = pred[sel].float(), target[sel]
    if p.shape[0] == 0:
        zero = pred.sum() * 0.0
        return {"loss": zero, "target_std": zero.detach()}
    std = t.std(dim=0).mean() if t.shape[0] > 1 else t.new_zeros(())
    return {"loss": F.mse_loss(p, t), "target_std": std.detach()}
