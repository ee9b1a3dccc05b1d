"""Listwise ITM over the retriever's own neighbourhood, with a residual score.

The re-ranking score of a pair is ITC's similarity plus a learned correction:

    z(q, c) = w * stop_grad(s_itc(q, c)) / tau + r(q, c)

where ``r`` is the re-ranking head's output on the fused pair state (plus a learned weight
on the ITM margin; both start at zero, :meth:`dmp_core.models.DMPModel.pair_scores`), so at
initialisation the re-ranked order *is* ITC's order and training can only learn
corrections. ``w`` is 1 in training; evaluation chooses it (and k) on the val split.

Training groups (Gao, Dai & Callan, ECIR 2021, "localized contrastive estimation"): for
each anchor and direction, the positive and its ``K`` ITC-nearest in-batch candidates
of *other* images (never the same image, never a byte-identical caption: those are true
matches), with one cross-entropy over the ``K + 1`` scores. The head is thus trained on
the negatives re-ranking will meet at test time, the ITC top-k, and not on one sampled
negative among a batch that is mostly easy. Easy negatives give it no gradient (the ITC
term already ranks them last), so the fusion learns to match at all from the seed's
binary ITM, kept beside it (``objective.itm_loss: both``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dmp_core.losses.itc import same_pair


def neighbour_groups(sim: Optional[torch.Tensor], image_ids: torch.Tensor, k: int, *,
                     all_ids: Optional[torch.Tensor] = None, texts: Optional[torch.Tensor] = None,
                     all_texts: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-``sim`` allowed candidates of every row.

    ``sim`` [B, M]: row anchors against the (gathered) candidates, or None for ``k``
    candidates drawn uniformly (``generator``). A candidate is allowed unless it shows the
    row's image (``image_ids`` [B] vs ``all_ids`` [M], default ``image_ids``) or carries a
    caption identical to the row's (token ids ``texts`` [B, L] vs ``all_texts`` [M, L]).
    Returns ``(index [B, k] long, valid [B, k] bool)``; where a row has fewer than ``k``
    allowed candidates the rest are invalid (index 0)."""
    cols = image_ids if all_ids is None else all_ids
    text_cols = texts if all_texts is None else all_texts
    allowed = ~same_pair(image_ids, cols, texts, text_cols)
    k = min(k, cols.shape[0])
    if sim is None:
        sim = torch.rand(allowed.shape, generator=generator).to(allowed.device)
    scores = sim.detach().float().masked_fill(~allowed, float("-inf"))
    top = scores.topk(k, dim=1)
    valid = torch.isfinite(top.values)
    return torch.where(valid, top.indices, torch.zeros_like(top.indices)), valid


def residual_scores(sim: torch.Tensor, margin: torch.Tensor, tau: float, itc_weight: float = 1.0) -> torch.Tensor:
    """``itc_weight * stop_grad(sim) / tau + margin`` (any matching shapes)."""
    return itc_weight * sim.detach().float() / tau + margin.float()


def listwise_loss(scores: torch.Tensor, valid: torch.Tensor,
                  soft_targets: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Cross-entropy over groups: ``scores`` [R, 1 + K] with the positive in column 0,
    ``valid`` [R, 1 + K] (column 0 always valid). With ``soft_targets`` [R, 1 + K] (rows
    summing to 1, zero where invalid) the target is that distribution instead of the
    one-hot positive. Returns ``loss`` (mean over rows) and ``acc`` (share of rows whose
    positive scores highest)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    logp = F.log_softmax(masked, dim=1)
    if soft_targets is None:
        loss = -logp[:, 0]
    else:
        loss = -(soft_targets * logp.masked_fill(~valid, 0.0)).sum(dim=1)
    acc = (masked.argmax(dim=1) == 0).float().mean()
    return {"loss": loss.mean(), "acc": acc.detach()}
