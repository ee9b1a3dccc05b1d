"""Refit the re-ranking head on the retriever's own top-k (localized contrastive estimation).

Training teaches the re-ranking head with in-batch groups: each anchor's K ITC-nearest
candidates among a batch of 32 (:mod:`dmp_core.losses.rerank`). At test time the head
orders each query's ITC top-k among the whole split (2,500 captions on the default),
negatives far harder than any a batch holds. Gao, Dai & Callan (ECIR 2021) train the
re-ranker on the retriever's own top list for this reason. This module does that as the
last step of training the re-ranker, with everything else frozen:

1. ``train``: the first ``eval.rerank_fit_images`` (2,000) images of the training split.
   Every image query's and the first ``eval.rerank_fit_captions`` caption queries' of each
   image ITC top-k among them (k = ``eval.k_test``) is fused once, and the pair states
   (:meth:`DMPModel.pair_state`) and ITM margins are kept (:class:`PairBank`).
2. The head (``rank_head`` and the weight on the margin) is fitted by cross-entropy over
   each query's k candidates with the residual score ``s / tau + r``: the target is the set of gold candidates (queries without one
   give no signal and are left out), and a candidate of another image that carries a
   caption byte-identical to a gold one is left out of the group (a true match). The
   head's last layer and the margin weight restart from zero, its hidden layer keeps what
   training learnt: before the first step the re-ranked order is ITC's exactly.
3. Every ``eval.rerank_fit_every`` steps, and before the first, the head is scored on the
   val split's bank with the re-ranker's val grid (k x ITC weight, :func:`choose_rerank`);
   the best step wins, ties to the earlier one. Step 0 is ITC's order, so where no step
   beats ITC on val the re-ranker keeps ITC's ranks. The test split never chooses anything.
4. With ``eval.rerank_gate`` (:func:`gate_rerank`), the chosen re-ranker is kept only where
   its val gain over ITC lies above its own noise (a paired cluster bootstrap interval
   above 0); otherwise the head is reset to zero and the re-ranked order is ITC's. The
   best of ~13 steps x the val grid is an optimistic pick: a gain of +0.8 on val that the
   interval does not separate from 0 went to -0.1 on test (MAMO, pretraining fraction 0.1).

Cost: one extra encode and fusion pass over the train subset's top-k (2,000 images' top-16:
about four times the default's test split), then a few seconds of head updates on the
stored states.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dmp_core.evaluation.retrieval import (CandidatePairs, Candidates, RetrievalSplit, candidate_pairs, choose_rerank,
                                           encode_split, img2txt_from_txt2img, itc_similarity, pair_states,
                                           retrieval_ranks, scorer_matrices)
from dmp_core.stats import paired_bootstrap


@dataclass
class PairBank:
    """One split's ITC top-k with the fused state and ITM margin of every distinct pair."""

    pairs: CandidatePairs
    sim_i2t: np.ndarray  # [images, texts] ITC similarity
    txt2img: np.ndarray  # [texts]
    input_ids: np.ndarray  # [texts, L]: identical captions are told apart by their tokens
    states: torch.Tensor  # [pairs, D] float32
    margins: torch.Tensor  # [pairs] float32


def first_captions(txt2img: np.ndarray, per_image: int) -> np.ndarray:
    """The ids of the first ``per_image`` captions of every image (in split order), sorted."""
    img2txt = img2txt_from_txt2img(txt2img, int(np.max(txt2img, initial=-1)) + 1)  # each image's, in split order
    return np.array(sorted(t for texts in img2txt for t in texts[:per_image]), dtype=np.int64)


def pair_bank(model: nn.Module, data: RetrievalSplit, k: int, *, batch_size: int, itm_batch_size: int,
              chunk_size: int, device: torch.device | str, captions_per_image: Optional[int] = None) -> PairBank:
    """Encode ``data``, take every query's ITC top-``k`` among the whole split and fuse each
    distinct pair once. ``captions_per_image``: only the first so many captions of each image
    are caption queries (every caption stays a candidate of the image queries); None: all."""
    was_training = model.training
    model.eval()
    try:
        enc = encode_split(model, data, batch_size, device)
        sim = itc_similarity(enc, chunk_size)
        queries = None if captions_per_image is None else first_captions(data.txt2img, captions_per_image)
        pairs = candidate_pairs(sim, k, chunk_size, text_queries=queries)
        n_texts = sim.shape[1]
        states, margins = pair_states(model, enc, pairs.unique // n_texts, pairs.unique % n_texts, itm_batch_size)
    finally:
        model.train(was_training)
    return PairBank(pairs=pairs, sim_i2t=sim, txt2img=np.asarray(data.txt2img, dtype=np.int64),
                    input_ids=np.asarray(data.input_ids), states=states, margins=margins)


class Corrector(nn.Module):
    """The re-ranking correction ``r = rank_head(state) + a * margin`` (a copy of the model's).

    ``restart``: the head's last layer and ``a`` start again from zero, so that ``r`` is 0 and
    the re-ranked order is ITC's exactly; the head's hidden layer keeps what training learnt."""

    def __init__(self, model: nn.Module, restart: bool = False):
        super().__init__()
        self.head = copy.deepcopy(model.rank_head).float()
        self.margin_weight = nn.Parameter(model.rank_margin_weight.detach().float().clone())
        if restart:
            with torch.no_grad():
                last = self.head[-1]
                last.weight.zero_()
                last.bias.zero_()
                self.margin_weight.zero_()

    def forward(self, states: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        return self.head(states).squeeze(-1) + self.margin_weight * margins

    @torch.no_grad()
    def copy_into(self, model: nn.Module) -> None:
        """Write this head into ``model`` (its ``rank_head`` and ``rank_margin_weight``)."""
        dtype = next(model.rank_head.parameters()).dtype
        model.rank_head.load_state_dict({k: v.to(dtype) for k, v in self.head.state_dict().items()})
        model.rank_margin_weight.copy_(self.margin_weight.to(model.rank_margin_weight.dtype))


@torch.no_grad()
def bank_candidates(bank: PairBank, corrector: Corrector, chunk: int = 65536) -> Candidates:
    """:class:`Candidates` of ``bank`` with ``corrector``'s corrections."""
    residual = torch.cat([corrector(bank.states[s : s + chunk], bank.margins[s : s + chunk])
                          for s in range(0, len(bank.margins), chunk)]) if len(bank.margins) else bank.margins
    return bank.pairs.candidates(bank.sim_i2t, bank.margins.numpy(), residual.numpy())


@dataclass
class FitGroups:
    """One row per query with a gold candidate in its top-k: ``pair`` [Q, k] indexes the
    bank's distinct pairs, ``sim`` [Q, k] the ITC similarities, ``gold`` and ``allowed``
    [Q, k] bool (a non-gold candidate with a caption identical to a gold one is not allowed)."""

    pair: torch.Tensor
    sim: torch.Tensor
    gold: torch.Tensor
    allowed: torch.Tensor


def fit_groups(bank: PairBank) -> FitGroups:
    pairs, txt2img = bank.pairs, bank.txt2img
    n_images, n_texts = bank.sim_i2t.shape
    _, key = np.unique(bank.input_ids, axis=0, return_inverse=True)  # one id per distinct caption
    key = key.reshape(-1)
    image_keys: list[set[int]] = [set() for _ in range(n_images)]
    for text, image in enumerate(txt2img):
        image_keys[image].add(int(key[text]))
    # does image i carry a caption with the tokens of caption t? (one check, both directions)
    shows_caption = np.vectorize(lambda i, t: int(key[t]) in image_keys[i])
    i2t_top, t2i_top = pairs.i2t_top.numpy(), pairs.t2i_top.numpy()
    rows = np.arange(n_images)[:, None]
    i2t_gold = txt2img[i2t_top] == rows
    i2t_allowed = i2t_gold | ~shows_caption(np.broadcast_to(rows, i2t_top.shape), i2t_top)
    texts = (np.arange(n_texts) if pairs.t2i_texts is None else pairs.t2i_texts.numpy())[:, None]  # caption queries
    t2i_gold = t2i_top == txt2img[texts]
    t2i_allowed = t2i_gold | ~shows_caption(t2i_top, np.broadcast_to(texts, t2i_top.shape))
    n = i2t_top.size
    inverse = pairs.inverse.numpy()
    sides = [(inverse[:n].reshape(i2t_top.shape), bank.sim_i2t[rows, i2t_top], i2t_gold, i2t_allowed),
             (inverse[n:].reshape(t2i_top.shape), bank.sim_i2t[t2i_top, texts], t2i_gold, t2i_allowed)]
    width = max(i2t_top.shape[1], t2i_top.shape[1])  # k clipped differently on a split smaller than k
    pair, sim, gold, allowed = (np.concatenate([np.pad(side[j], ((0, 0), (0, width - side[j].shape[1])))
                                                for side in sides]) for j in range(4))  # padding: not allowed
    keep = gold.any(axis=1)
    return FitGroups(pair=torch.from_numpy(pair[keep]), sim=torch.from_numpy(sim[keep]).float(),
                     gold=torch.from_numpy(gold[keep]), allowed=torch.from_numpy(allowed[keep]))


def group_loss(corrector: Corrector, bank: PairBank, groups: FitGroups, rows: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over ``rows`` of ``-log P(gold)`` under the softmax of ``s / tau + r`` over the allowed candidates."""
    pair = groups.pair[rows]
    z = groups.sim[rows] / tau + corrector(bank.states[pair.reshape(-1)],
                                           bank.margins[pair.reshape(-1)]).reshape(pair.shape)
    z = z.masked_fill(~groups.allowed[rows], float("-inf"))
    return (torch.logsumexp(z, dim=1) - torch.logsumexp(z.masked_fill(~groups.gold[rows], float("-inf")), dim=1)).mean()


def fit_rerank_head(model: nn.Module, train: PairBank, val: PairBank, *, steps: int, lr: float, batch: int,
                    every: int, tau: float, ks: Sequence[int], itc_weights: Sequence[float],
                    seed: int) -> dict[str, Any]:
    """Fit the re-ranking head on ``train``'s groups; keep the step whose val grid R mean is
    best. The head restarts from zero output (:class:`Corrector` ``restart``), so step 0 is
    ITC's order exactly and a fit that does not help on val leaves the test ranks at ITC's.
    Writes the chosen head into ``model`` and returns
    ``{"steps", "chosen_step", "val_r_mean" {step: R mean}, "train_loss" {step: loss},
    "train_queries", "choice"}`` (``choice``: the val grid's pick for the chosen head). When no
    training query has a gold candidate in its top-k (``train_queries`` 0) it takes no step:
    the head stays at zero and the re-ranked order is ITC's."""
    groups = fit_groups(train)
    corrector = Corrector(model, restart=True)
    best_state: Optional[dict[str, torch.Tensor]] = None
    best: Optional[tuple[float, int, dict[str, Any]]] = None
    val_curve: dict[int, float] = {}
    loss_curve: dict[int, float] = {}
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(corrector.parameters(), lr=lr)
    all_rows = torch.arange(len(groups.pair))

    def check(step: int) -> None:
        nonlocal best, best_state
        choice = choose_rerank(bank_candidates(val, corrector), val.sim_i2t, val.txt2img, ks, itc_weights, tau)
        val_curve[step] = round(choice["r_mean"], 4)
        if len(all_rows):
            with torch.no_grad():
                loss_curve[step] = round(float(group_loss(corrector, train, groups, all_rows, tau)), 5)
        if best is None or choice["r_mean"] > best[0]:
            best = (choice["r_mean"], step, choice)
            best_state = copy.deepcopy(corrector.state_dict())

    check(0)
    if not len(groups.pair):  # no training query has its gold in its top-k: nothing to learn from
        steps = 0
    for step in range(1, steps + 1):
        rows = torch.randint(len(groups.pair), (min(batch, len(groups.pair)),), generator=gen)
        loss = group_loss(corrector, train, groups, rows, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            check(step)
    assert best is not None and best_state is not None
    corrector.load_state_dict(best_state)
    corrector.copy_into(model)
    return {"steps": steps, "chosen_step": best[1], "val_r_mean": val_curve, "train_loss": loss_curve,
            "train_queries": len(groups.pair), "choice": best[2]}


def gate_rerank(model: nn.Module, bank: PairBank, choice: dict[str, Any], *, tau: float, level: float,
                clusters: Optional[np.ndarray] = None, seed: int = 0, n_samples: int = 2000) -> dict[str, Any]:
    """Keep the re-ranker in ``model`` (its head, with ``choice``'s k and ITC weight) only
    where it beats ITC on ``bank`` (the val split) beyond noise: the paired cluster
    bootstrap interval at ``level`` of its R mean minus ITC's (:func:`dmp_core.stats.paired_bootstrap`,
    the resampled unit being the image or its ``clusters`` entry) must lie above 0. Otherwise
    the head's last layer and the margin weight are set to zero in ``model``, so that the
    re-ranked order is ITC's exactly. Returns ``{"level", "diff", "lo", "hi", "kept"}``
    (R mean points)."""
    n_images = bank.sim_i2t.shape[0]
    img2txt = img2txt_from_txt2img(bank.txt2img, n_images)
    i2t, t2i = scorer_matrices(bank_candidates(bank, Corrector(model)), bank.sim_i2t, "rerank", k=choice["k"],
                               itc_weight=choice["itc_weight"], tau=tau)
    reranked = retrieval_ranks(i2t, t2i, bank.txt2img, img2txt)
    itc = retrieval_ranks(bank.sim_i2t, np.ascontiguousarray(bank.sim_i2t.T), bank.txt2img, img2txt)
    gain = paired_bootstrap(reranked, itc, bank.txt2img, n_samples=n_samples, seed=seed, level=level,
                            clusters=clusters)["r_mean"]
    kept = bool(gain["lo"] > 0)
    if not kept:
        Corrector(model, restart=True).copy_into(model)
    return {"level": level, "diff": round(gain["diff"], 4), "lo": round(gain["lo"], 4), "hi": round(gain["hi"], 4),
            "kept": kept}
