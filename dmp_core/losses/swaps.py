"""Swapped-caption negatives for ITM: the anchor's own caption with its attribute binding
or a spatial relation contradicted (NegCLIP / ARO's order-and-binding negatives,
Yuksekgonul et al. 2023).

In-batch negatives of random scenes almost never differ from the anchor in binding
alone: a batch of 32 synthetic scenes seldom holds two with the same colours on other
shapes, yet that is what the ITC top-k holds at test time (and what captions of real
photos with two coloured things need). A swapped caption is such a negative by
construction, drawn per anchor:

* **exchange** classes (colours, sizes): two words of the class with different meanings
  trade places ("a red circle and a blue square" -> "a blue circle and a red square");
  synonyms (purple / violet) never count as different;
* **antonym** classes (left / right, above / below, top / bottom): one word is replaced by
  the first word of the opposite meaning ("left of" -> "right of").

Each row takes one operation drawn uniformly from those its caption allows; a caption with
none yields no negative (``ok`` False). Words are matched as single WordPiece tokens of
the run's vocabulary (:func:`dmp_core.data.text.swap_table` builds the table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# meaning groups per class; words of one group are synonyms
EXCHANGE_CLASSES: dict[str, tuple[tuple[str, ...], ...]] = {
    "colour": (("red",), ("orange",), ("yellow",), ("green",), ("cyan", "turquoise"), ("blue",),
               ("purple", "violet"), ("pink",), ("white",), ("black",), ("brown",), ("grey", "gray")),
    "size": (("small", "little", "tiny"), ("large", "big")),
}
ANTONYM_CLASSES: dict[str, tuple[tuple[str, ...], ...]] = {
    "horizontal": (("left",), ("right",)),
    "vertical": (("above", "over"), ("below", "under", "beneath")),
    "edge": (("top",), ("bottom",)),
}


@dataclass(frozen=True)
class SwapTable:
    """Token ids of the word classes: per class, a tuple of meaning groups (tuples of ids)."""

    exchange: tuple[tuple[tuple[int, ...], ...], ...]
    antonym: tuple[tuple[tuple[int, ...], ...], ...]

    def lookup(self) -> dict[int, tuple[str, int, int]]:
        """token id -> (kind, class index, group index)."""
        out: dict[int, tuple[str, int, int]] = {}
        for kind, classes in (("exchange", self.exchange), ("antonym", self.antonym)):
            for c, groups in enumerate(classes):
                for g, ids in enumerate(groups):
                    for token in ids:
                        out[token] = (kind, c, g)
        return out


def _operations(row: list[int], lookup: dict[int, tuple[str, int, int]]) -> list[tuple]:
    """Every contradiction this caption allows: ("x", i, j) swaps positions i, j;
    ("r", i, class, group) replaces position i with the first word of another group."""
    found: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for pos, token in enumerate(row):
        hit = lookup.get(token)
        if hit is not None:
            found.setdefault(hit[:2], []).append((pos, hit[2]))
    ops: list[tuple] = []
    for (kind, cls), places in found.items():
        if kind == "exchange":
            ops += [("x", i, j) for a, (i, gi) in enumerate(places) for (j, gj) in places[a + 1:] if gi != gj]
        else:
            ops += [("r", i, cls, g) for i, g in places]
    return ops


def swap_captions(ids: torch.Tensor, table: SwapTable, *, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` [B, L] -> (swapped ids [B, L], ok [B] bool). Rows without an allowed
    operation are returned unchanged with ok False. Draws from torch's global RNG unless a
    ``generator`` is given (deterministic given the seed)."""
    lookup = table.lookup()
    out = ids.clone()
    ok = torch.zeros(ids.shape[0], dtype=torch.bool)
    draws = torch.rand(ids.shape[0], generator=generator).tolist()
    for r, row in enumerate(ids.tolist()):
        ops = _operations(row, lookup)
        if not ops:
            continue
        op = ops[min(int(draws[r] * len(ops)), len(ops) - 1)]
        if op[0] == "x":
            _, i, j = op
            out[r, i], out[r, j] = ids[r, j], ids[r, i]
        else:
            _, i, cls, group = op
            groups = table.antonym[cls]
            other = next(g for k, g in enumerate(groups) if k != group)
            out[r, i] = other[0]
        ok[r] = True
    return out, ok.to(ids.device)
