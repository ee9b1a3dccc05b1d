"""SimMIM block masks and post-tokenisation text masks."""
from __future__ import annotations

import math

import pytest
import torch

from dmp_core.masking import IGNORE_INDEX, SpecialTokens, image_block_mask, mask_text

SPECIAL = SpecialTokens()


@pytest.mark.parametrize("grid,ratio", [((4, 4), 0.75), ((8, 8), 0.75), ((14, 14), 0.6), ((7, 7), 0.5)])
def test_image_mask_is_whole_blocks(grid, ratio):
    gen = torch.Generator().manual_seed(0)
    mask = image_block_mask(16, grid, ratio, generator=gen)
    gh, gw = grid
    assert mask.shape == (16, gh * gw) and mask.dtype == torch.bool
    bh, bw = math.ceil(gh / 2), math.ceil(gw / 2)
    want_blocks = math.ceil(bh * bw * ratio)
    for row in mask.view(16, gh, gw):
        blocks = 0
        for by in range(bh):
            for bx in range(bw):
                cell = row[2 * by:2 * by + 2, 2 * bx:2 * bx + 2]
                assert cell.all() or not cell.any()  # a block is masked entirely or not at all
                blocks += bool(cell.any())
        assert blocks == want_blocks


def test_image_mask_follows_the_seed():
    a = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(1))
    b = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(1))
    c = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = image_block_mask(4, (8, 8), 0.75)
    torch.manual_seed(3)
    assert torch.equal(d, image_block_mask(4, (8, 8), 0.75))  # global RNG by default


def _batch():
    rows = [
        [101, 2000, 2001, 2002, 2003, 2004, 2005, 2006, 2007, 102],
        [101, 2010, 2011, 102, 0, 0, 0, 0, 0, 0],
        [101, 2020, 102, 0, 0, 0, 0, 0, 0, 0],
        [101, 102, 0, 0, 0, 0, 0, 0, 0, 0],  # empty caption: nothing to mask
    ]
    ids = torch.tensor(rows)
    return ids, (ids != 0).long()


@pytest.mark.parametrize("ratio", [0.25, 0.4])
def test_text_mask_never_touches_special_tokens(ratio):
    ids, attn = _batch()
    for seed in range(20):
        masked, labels = mask_text(ids, attn, ratio, special=SPECIAL, vocab_size=30522,
                                   generator=torch.Generator().manual_seed(seed))
        for b in range(ids.shape[0]):
            real = [p for p in range(ids.shape[1]) if attn[b, p] and ids[b, p] not in (101, 102, 0)]
            chosen = [p for p in range(ids.shape[1]) if labels[b, p] != IGNORE_INDEX]
            assert set(chosen) <= set(real)
            assert len(chosen) == (max(1, round(ratio * len(real))) if real else 0)
            for p in range(ids.shape[1]):
                if p in chosen:
                    assert labels[b, p] == ids[b, p] and masked[b, p] == SPECIAL.mask
                else:
                    assert masked[b, p] == ids[b, p]


def test_bert_rule_80_10_10():
    ids = torch.full((400, 52), 2000)
    ids[:, 0], ids[:, -1] = 101, 102
    attn = torch.ones_like(ids)
    masked, labels = mask_text(ids, attn, 0.5, special=SPECIAL, vocab_size=1000, rule="bert",
                               generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (masked[chosen] == SPECIAL.mask).sum().item() / n
    kept = (masked[chosen] == 2000).sum().item() / n
    assert 0.77 < as_mask < 0.83 and 0.08 < kept < 0.12  # the rest are random ids
    assert (masked[~chosen] == ids[~chosen]).all()


def test_special_tokens_from_meta():
    st = SpecialTokens.from_meta({"pad_id": 1, "cls_id": 2, "sep_id": 3, "mask_id": 4})
    assert (st.pad, st.cls, st.sep, st.mask) == (1, 2, 3, 4)
    assert SpecialTokens.from_meta({"mask_token_id": 9}).mask == 9
