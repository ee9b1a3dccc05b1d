"""ITM: hard negatives from the in-batch similarity softmax (METHOD.md 3.5) and the 2-way loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dmp_core.losses.itc import same_pair


def sample_negatives(sim: Optional[torch.Tensor], image_ids: torch.Tensor, *,
                     all_ids: Optional[torch.Tensor] = None, sim_t2i: Optional[torch.Tensor] = None,
                     texts: Optional[torch.Tensor] = None, all_texts: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image row and one negative image per text row.

    In one process ``sim`` [B, B] are the image->text logits (similarity / temperature) and
    the text->image logits are its transpose. Under DDP the candidates are the gathered
    batch: pass its image ids ``all_ids`` [M] and both rectangular logit matrices, ``sim``
    [B, M] (local images vs all texts) and ``sim_t2i`` [B, M] (local texts vs all images);
    the returned indices then point into the gathered batch. ``sim=None`` samples uniformly.
    Weights = fp32 softmax with every same-image entry zeroed, and, when the captions' token
    ids ``texts`` [B, L] (and under DDP ``all_texts`` [M, L]) are given, every entry whose
    caption is identical to the row's: such a "negative" is as true as the positive, and
    the hardest ones (the ones ITC ranks first) would be exactly these. A row whose weights vanish
    (underflow) falls back to uniform over its allowed entries. Returns
    ``(neg_text_for_image, neg_image_for_text)``, each [B] long, with -1 where a row has no
    allowed entry at all (every candidate shows the same image).
    """
    batch = image_ids.shape[0]
    cols = image_ids if all_ids is None else all_ids
    text_cols = texts if all_texts is None else all_texts
    allowed = ~same_pair(image_ids, cols, texts, text_cols)  # [B, M]; symmetric when M == B in one process
    if sim is None:
        sim = sim_t2i = torch.zeros(batch, cols.shape[0], device=image_ids.device)
    sim = sim.detach().float()
    t2i = sim.t() if sim_t2i is None else sim_t2i.detach().float()
    picks = []
    for logits in (sim, t2i):
        weights = F.softmax(logits, dim=1) * allowed
        uniform = allowed.float()
        fallback = ~(weights.sum(dim=1, keepdim=True) > 0) | ~torch.isfinite(weights).all(dim=1, keepdim=True)
        weights = torch.where(fallback, uniform, weights)
        has_any = allowed.any(dim=1)
        weights = torch.where(has_any[:, None], weights, torch.ones_like(weights))  # placeholder, dropped below
        index = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(image_ids.device)
        picks.append(torch.where(has_any, index, torch.full_like(index, -1)))
    return picks[0], picks[1]


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way ITM head (label 1 = matched pair)."""
    return F.cross_entropy(logits.float(), labels)
