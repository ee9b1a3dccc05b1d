"""SimMIM block masks and post-tokenisation text masks."""
from __future__ import annotations

import math

import pytest
import torch

from dmp_core.losses.masking import IGNORE_INDEX, SpecialTokens, image_block_mask, mask_text, stochastic_count

SPECIAL = SpecialTokens()


@pytest.mark.parametrize("grid,ratio", [((4, 4), 0.75), ((8, 8), 0.75), ((14, 14), 0.6), ((7, 7), 0.5)])
def test_image_mask_is_whole_blocks(grid, ratio):
    gen = torch.Generator().manual_seed(0)
    mask = image_block_mask(16, grid, ratio, generator=gen)
    gh, gw = grid
    assert mask.shape == (16, gh * gw) and mask.dtype == torch.bool
    bh, bw = math.ceil(gh / 2), math.ceil(gw / 2)
    expected = bh * bw * ratio  # stochastic rounding: floor or ceil, within [1, blocks - 1]
    want_blocks = {min(max(1, k), bh * bw - 1) for k in (math.floor(expected), math.ceil(expected))}
    for row in mask.view(16, gh, gw):
        blocks = 0
        for by in range(bh):
            for bx in range(bw):
                cell = row[2 * by:2 * by + 2, 2 * bx:2 * bx + 2]
                assert cell.all() or not cell.any()  # a block is masked entirely or not at all
                blocks += bool(cell.any())
        assert blocks in want_blocks


def test_image_mask_follows_the_seed():
    a = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(1))
    b = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(1))
    c = image_block_mask(4, (8, 8), 0.75, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = image_block_mask(4, (8, 8), 0.75)
    torch.manual_seed(3)
    assert torch.equal(d, image_block_mask(4, (8, 8), 0.75))  # global RNG by default


def _block_counts(mask: torch.Tensor) -> torch.Tensor:
    """Masked blocks per row on the 4x4 patch grid tiled by 2x2 blocks (a 2x2 block grid)."""
    return mask.view(-1, 2, 2, 2, 2).any(dim=2).any(dim=-1).sum(dim=(1, 2))


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75])
def test_image_mask_count_is_unbiased_on_the_default_grid(ratio):
    """64 px / 16 px patches = 2x2 blocks: E[masked blocks] = 4 * ratio, where ceil() gave
    3 blocks for every ratio in (0.5, 0.75]."""
    rows = 4000
    counts = _block_counts(image_block_mask(rows, (4, 4), ratio, generator=torch.Generator().manual_seed(0)))
    expected = 4 * ratio
    p = expected - math.floor(expected)  # count = floor + Bernoulli(p)
    stderr = math.sqrt(p * (1 - p) / rows)
    assert abs(float(counts.float().mean()) - expected) <= 5 * stderr + 1e-6


@pytest.mark.parametrize("ratio", [0.1, 0.9])
def test_image_mask_never_masks_all_or_nothing(ratio):
    mask = image_block_mask(4000, (4, 4), ratio, generator=torch.Generator().manual_seed(0))
    assert mask.any(dim=1).all() and not mask.all(dim=1).any()
    assert set(_block_counts(mask).unique().tolist()) == ({1} if ratio < 0.5 else {3})


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75, 0.3])
def test_image_mask_count_takes_the_two_neighbouring_integers(ratio):
    counts = _block_counts(image_block_mask(4000, (4, 4), ratio, generator=torch.Generator().manual_seed(0)))
    expected = 4 * ratio
    values = set(counts.unique().tolist())
    assert values <= {math.floor(expected), math.ceil(expected)}
    if expected != math.floor(expected):
        assert len(values) == 2  # both neighbours occur over 4000 rows


def test_image_mask_single_block_is_masked():
    """With one block (grid <= block) the clamp to at least one wins: the whole image is masked."""
    for ratio in (0.1, 0.5, 0.9):
        assert image_block_mask(3, (2, 2), ratio, generator=torch.Generator().manual_seed(0)).all()


def test_image_mask_is_deterministic_given_the_seed_on_the_default_grid():
    a = image_block_mask(64, (4, 4), 0.6, generator=torch.Generator().manual_seed(7))
    b = image_block_mask(64, (4, 4), 0.6, generator=torch.Generator().manual_seed(7))
    c = image_block_mask(64, (4, 4), 0.6, generator=torch.Generator().manual_seed(8))
    assert a.shape == (64, 16) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


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
            expected = ratio * len(real)  # stochastic rounding: floor or ceil, at least one
            assert (len(chosen) in {max(1, math.floor(expected)), max(1, math.ceil(expected))}) if real else not chosen
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


@pytest.mark.parametrize("n, ratio", [(6, 0.25), (6, 0.40), (7, 0.15), (13, 0.40), (20, 0.33)])
def test_stochastic_rounding_has_the_expected_count(n, ratio):
    """E[count] = ratio * n (when that is >= 1): 0.25 and 0.40 of a 6-token caption now mask
    1.5 and 2.4 tokens on average, where round() gave 2 for both."""
    draws = 20000
    counts = stochastic_count(torch.full((draws,), n), ratio, generator=torch.Generator().manual_seed(0)).float()
    expected = ratio * n
    assert set(counts.unique().tolist()) <= {math.floor(expected), math.ceil(expected)}
    stderr = float(counts.std()) / math.sqrt(draws) + 1e-9
    assert abs(float(counts.mean()) - expected) < 4 * stderr + 1e-6


def test_stochastic_count_floor_of_one_and_empty_rows():
    counts = stochastic_count(torch.tensor([0, 1, 2, 3]), 0.1, generator=torch.Generator().manual_seed(0))
    assert counts.tolist() == [0, 1, 1, 1]
    assert stochastic_count(torch.tensor([4]), 0.999).tolist() in ([3], [4])


def test_ratio_ablation_differs_on_short_captions():
    """The mean number of masked tokens differs between 0.25 and 0.40 on 6-token captions."""
    ids = torch.tensor([[101] + list(range(2000, 2006)) + [102]] * 4000)
    attn = torch.ones_like(ids)
    means = []
    for ratio in (0.25, 0.40):
        _, labels = mask_text(ids, attn, ratio, special=SPECIAL, vocab_size=30522,
                              generator=torch.Generator().manual_seed(1))
        means.append(float((labels != IGNORE_INDEX).sum(dim=1).float().mean()))
    assert means[0] == pytest.approx(1.5, abs=0.05) and means[1] == pytest.approx(2.4, abs=0.05)
