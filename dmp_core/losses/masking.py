"""Masks for the masked-modelling objectives (METHOD.md section 2).

Both draw from torch's global RNG unless a ``generator`` is passed, so a run is
deterministic given the seed. Image masks are True where a patch is masked; text
masks are chosen on the token ids, *after* tokenisation (labels stay aligned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (torch cross-entropy's default)


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special ids (meta.json); defaults are MiniLM's uncased WordPiece vocabulary."""

    pad: int = 0
    cls: int = 101
    sep: int = 102
    mask: int = 103

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "SpecialTokens":
        """Read ``pad_id``/``cls_id``/``sep_id``/``mask_id`` (or ``*_token_id``) from data/prepared/meta.json."""
        def pick(name: str) -> int:
            for key in (f"{name}_id", f"{name}_token_id"):
                if key in meta:
                    return int(meta[key])
            return int(getattr(cls, name))

        return cls(pad=pick("pad"), cls=pick("cls"), sep=pick("sep"), mask=pick("mask"))


def image_block_mask(batch: int, grid: tuple[int, int], ratio: float, *, block: int = 2,
                     generator: Optional[torch.Generator] = None, device: Any = None) -> torch.Tensor:
    """SimMIM block masking: ``[B, N]`` bool, True = masked, row-major patch order.

    The patch grid is tiled by ``block x block`` blocks (2x2 patches = 32 px at 224 px with
    16 px patches); edge blocks are cropped when the grid is not a multiple of ``block``.
    The number of masked blocks is drawn per image by stochastic rounding, as for text
    (:func:`stochastic_count`): ``floor(ratio * blocks)`` plus one with probability
    ``frac(ratio * blocks)``, so its expectation is ``ratio * blocks``; it is then clamped to
    ``[1, blocks - 1]``: at least one block is masked and never all of them (the clamp moves
    the expectation at ratios below ``1 / blocks`` or above ``1 - 1 / blocks``). With a single
    block (``blocks == 1``) that block is always masked. ``ceil(ratio * blocks)`` made every
    ratio in (0.5, 0.75] mask 3 of the 4 blocks of the 64 px default (4x4 patches = 2x2
    blocks) and every ratio above 0.75 mask the whole image. Draws from ``generator``
    (torch's global RNG when None): first the counts, then the block scores."""
    gh, gw = grid
    bh, bw = math.ceil(gh / block), math.ceil(gw / block)
    n_blocks = bh * bw
    n_masked = stochastic_count(torch.full((batch,), n_blocks), ratio, generator=generator)
    if n_blocks > 1:
        n_masked = n_masked.clamp(max=n_blocks - 1)
    scores = torch.rand(batch, n_blocks, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # each block's rank in a random order of its row
    blocks = (rank < n_masked[:, None]).view(batch, bh, bw)
    patches = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :gh, :gw]
    return patches.reshape(batch, gh * gw).to(device)


def stochastic_count(n: torch.Tensor, ratio: float, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per row, ``floor(ratio * n) + Bernoulli(frac(ratio * n))`` clamped to ``[1, n]``
    (0 where ``n == 0``): an unbiased integer count of masked tokens."""
    expected = n.float() * ratio
    base = expected.floor()
    extra = (torch.rand(n.shape, generator=generator) < (expected - base)).float()
    count = (base + extra).clamp(min=1)
    return torch.where(n > 0, torch.minimum(count, n.float()), torch.zeros_like(count)).long()


def mask_text(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float, *,
              special: SpecialTokens, vocab_size: int, rule: str = "mask",
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a stochastically rounded ``ratio * n`` real tokens per caption (at least one).

    The count is ``floor(ratio * n)`` plus one with probability ``frac(ratio * n)``, so its
    expectation is ``ratio * n`` (before the floor of one): with ``round()`` a 6-token
    caption got 2 masks at both 0.25 and 0.40 and a ratio ablation compared nothing.
    Candidates are attended tokens other than [CLS]/[SEP]/[PAD]. ``rule="mask"`` replaces
    every chosen token by [MASK]; ``rule="bert"`` uses BERT's 80/10/10 (mask / random / keep).
    Returns ``(masked_ids, labels)`` with labels = original id at chosen positions, -100 elsewhere.
    A caption without candidates (e.g. empty) gets no mask.
    """
    if rule not in ("mask", "bert"):
        raise ValueError(f"objective.text_mask_rule: unknown rule {rule!r}")
    device = input_ids.device
    ids = input_ids.cpu()
    candidate = attention_mask.cpu().bool()
    for token in (special.pad, special.cls, special.sep):
        candidate &= ids != token
    n_candidates = candidate.sum(dim=1)
    n_chosen = stochastic_count(n_candidates, ratio, generator=generator)
    scores = torch.rand(ids.shape, generator=generator).masked_fill(~candidate, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position among its row's candidates
    chosen = candidate & (rank < n_chosen[:, None])

    labels = torch.full_like(ids, IGNORE_INDEX).masked_scatter(chosen, ids[chosen])
    masked = ids.clone()
    if rule == "mask":
        masked[chosen] = special.mask
    else:
        action = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
        masked = torch.where(chosen & (action < 0.8), torch.full_like(ids, special.mask), masked)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked.to(device), labels.to(device)
