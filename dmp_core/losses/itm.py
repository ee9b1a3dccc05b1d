"""ITM: hard negatives from the in-batch similarity softmax (METHOD.md 3.5) and the 2-way loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_negatives(sim: Optional[torch.Tensor], image_ids: torch.Tensor, *,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image row and one negative image per text column.

    ``sim`` [B, B] are image->text logits (similarity / temperature), or None for uniform
    sampling. Weights = fp32 softmax with every same-image entry zeroed; a row whose weights
    vanish (underflow) falls back to uniform over its allowed entries. Returns
    ``(neg_text_for_image, neg_image_for_text)``, each [B] long, with -1 where a row has no
    allowed entry at all (every item in the batch shows the same image).
    """
    batch = image_ids.shape[0]
    allowed = image_ids[:, None] != image_ids[None, :]
    if sim is None:
        sim = torch.zeros(batch, batch, device=image_ids.device)
    sim = sim.detach().float()
    picks = []
    for logits, ok in ((sim, allowed), (sim.t(), allowed.t())):
        weights = F.softmax(logits, dim=1) * ok
        uniform = ok.float()
        fallback = ~(weights.sum(dim=1, keepdim=True) > 0) | ~torch.isfinite(weights).all(dim=1, keepdim=True)
        weights = torch.where(fallback, uniform, weights)
        has_any = ok.any(dim=1)
        weights = torch.where(has_any[:, None], weights, torch.ones_like(weights))  # placeholder, dropped below
        index = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(image_ids.device)
        picks.append(torch.where(has_any, index, torch.full_like(index, -1)))
    return picks[0], picks[1]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way ITM head (label 1 = matched pair)."""
    return F.cross_entropy(logits.float(), labels)
