"""Swapped-caption ITM negatives: each is its anchor's caption with exactly one binding or
relation contradicted, and the Pretrainer scores them as negatives of the anchor's image."""
from __future__ import annotations

import torch

from conftest import tiny_config
from dmp_core.data.text import load_tokenizer, swap_table
from dmp_core.losses.swaps import swap_captions

CAPTIONS = [
    "a red circle and a blue square",  # colours exchange
    "a small star left of a large hexagon",  # sizes exchange, or left -> right
    "a purple circle and a violet square",  # synonyms only: nothing to exchange
    "a green triangle above a star",  # above -> below
    "two shapes",  # nothing
]


def _encode(captions):
    tok = load_tokenizer("minilm")
    enc = tok(captions, padding=True, return_tensors="pt")
    return tok, enc["input_ids"], enc["attention_mask"]


def test_each_swap_contradicts_exactly_one_binding_or_relation():
    tok, ids, _ = _encode(CAPTIONS)
    table = swap_table("minilm")
    seen = {r: set() for r in range(len(CAPTIONS))}
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        out, ok = swap_captions(ids, table, generator=gen)
        assert ok.tolist() == [True, True, False, True, False]
        assert torch.equal(out[~ok], ids[~ok])  # untouched where no contradiction exists
        for r in range(len(CAPTIONS)):
            seen[r].add(tok.decode(out[r], skip_special_tokens=True))
    assert seen[0] == {"a blue circle and a red square"}
    assert seen[1] == {"a large star left of a small hexagon", "a small star right of a large hexagon"}
    assert seen[3] == {"a green triangle below a star"}
    assert seen[2] == {CAPTIONS[2]} and seen[4] == {CAPTIONS[4]}


def test_swaps_are_deterministic_given_the_generator():
    _, ids, _ = _encode(CAPTIONS * 4)
    table = swap_table("minilm")
    a = swap_captions(ids, table, generator=torch.Generator().manual_seed(3))[0]
    b = swap_captions(ids, table, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_pretrainer_adds_one_negative_per_swappable_anchor():
    from test_meta_arch import _count_calls, build, make_batch

    batch = make_batch()
    b = batch["input_ids"].shape[0]
    _, ids, attn = _encode((CAPTIONS * 2)[:b])
    width = batch["input_ids"].shape[1]
    pad = torch.zeros(b, max(0, width - ids.shape[1]), dtype=ids.dtype)
    batch["input_ids"] = torch.cat([ids, pad], dim=1)[:, :width]
    batch["attention_mask"] = torch.cat([attn, pad], dim=1)[:, :width]
    swappable = sum(ok for ok in ([True, True, False, True, False] * 2)[:b])
    vocab = len(load_tokenizer("minilm"))
    plain = build(tiny_config(objective__mim=False, objective__mlm=False), vocab_size=vocab)
    swapping = build(tiny_config(objective__mim=False, objective__mlm=False, objective__itm_swap_negatives=True),
                     vocab_size=vocab)
    calls = {n: _count_calls(p.model, ("encode_text", "fuse")) for n, p in (("plain", plain), ("swap", swapping))}
    plain(batch)
    out = swapping(batch)
    assert calls["swap"]["encode_text"] == [b + swappable]  # still one text-tower call
    assert calls["swap"]["fuse"] == [calls["plain"]["fuse"][0] + swappable]
    assert out["diag_itm_swapped"].item() == swappable / b
