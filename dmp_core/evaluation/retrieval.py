"""Image-text retrieval evaluation in the ALBEF protocol (METHOD.md section 6).

1. Encode every image and every caption of the split once.
2. ITC similarity ``S = img_emb @ txt_emb.T`` for all pairs (computed in row chunks).
3. For each image, its top-``k_test`` captions by ``S`` are fused and scored by the ITM
   head's margin ``m = l1 - l0``; the same for each caption over images. Every pair
   outside a query's top-k scores below all of its candidates (``-100`` and below), in
   ITC's order.
4. Each scorer (:data:`SCORERS`) orders the candidates: the headline ``rerank`` is the
   residual score ``w * S / tau + r`` (r: the re-ranking head's correction,
   :mod:`dmp_core.losses.rerank`; ``k`` and ``w``
   chosen on the val split by :func:`choose_rerank`), ``itm`` the margin alone (ALBEF,
   the seed), ``itm_itc`` the margin plus ``S`` (BLIP); ``itc`` is ``S`` alone.
5. Text retrieval rank of an image = best rank among its gold captions; image
   retrieval rank of a caption = rank of its image. ``R@K = 100 * mean(rank < K)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from dmp_core.config import Config
from dmp_core.errors import DataError

RECALL_KS = (1, 5, 10)
NOT_RERANKED = -100.0  # score of every pair outside the top-k candidates


# ------------------------------------------------------------------ recall metrics
def img2txt_from_txt2img(txt2img: np.ndarray, n_images: int) -> list[list[int]]:
    """Gold caption ids per image, from the image id of every caption."""
    img2txt: list[list[int]] = [[] for _ in range(n_images)]
    for t, i in enumerate(np.asarray(txt2img).tolist()):
        img2txt[i].append(t)
    return img2txt


def retrieval_ranks(
    i2t: np.ndarray, t2i: np.ndarray, txt2img: np.ndarray, img2txt: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks: of the best gold caption per image, and of the gold image per caption.

    Ties are counted against the query (a non-gold candidate scoring the same as the
    gold one ranks before it), so pairs left at ``-100`` outside the top-k are never
    counted as retrieved by luck.
    """
    i2t = np.asarray(i2t)
    t2i = np.asarray(t2i)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_images, n_texts = i2t.shape
    if t2i.shape != (n_texts, n_images):
        raise DataError(f"t2i has shape {t2i.shape}, expected {(n_texts, n_images)} (texts, images)")
    if txt2img.shape != (n_texts,):
        raise DataError(f"txt2img has shape {txt2img.shape}, expected ({n_texts},)")
    if len(img2txt) != n_images or any(len(golds) == 0 for golds in img2txt):
        raise DataError("img2txt must list at least one gold caption for every image")

    gold = np.zeros((n_images, n_texts), dtype=bool)
    for i, golds in enumerate(img2txt):
        gold[i, list(golds)] = True
    best_gold = np.where(gold, i2t, -np.inf).max(axis=1)
    tr_ranks = ((i2t >= best_gold[:, None]) & ~gold).sum(axis=1)

    gold_score = t2i[np.arange(n_texts), txt2img]
    ir_ranks = (t2i >= gold_score[:, None]).sum(axis=1) - 1  # minus the gold image itself
    return tr_ranks, ir_ranks


def retrieval_metrics(
    i2t: np.ndarray, t2i: np.ndarray, txt2img: np.ndarray, img2txt: Sequence[Sequence[int]]
) -> dict[str, float]:
    """TR and IR R@1/5/10 (in percent), their means ``tr_mean``/``ir_mean``/``r_mean`` and ``rsum``.

    ``i2t`` is [images, texts], ``t2i`` is [texts, images]; ``txt2img[t]`` is the
    image of caption t and ``img2txt[i]`` the captions of image i.
    """
    tr_ranks, ir_ranks = retrieval_ranks(i2t, t2i, txt2img, img2txt)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"tr_r{k}"] = 100.0 * float(np.mean(tr_ranks < k))
    for k in RECALL_KS:
        out[f"ir_r{k}"] = 100.0 * float(np.mean(ir_ranks < k))
    out["tr_mean"] = float(np.mean([out[f"tr_r{k}"] for k in RECALL_KS]))
    out["ir_mean"] = float(np.mean([out[f"ir_r{k}"] for k in RECALL_KS]))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("tr", "ir") for k in RECALL_KS))
    return out


# --------------------------------------------------------------- evaluation split
@dataclass
class RetrievalSplit:
    """Everything retrieval needs from one prepared split (arrays may be memory-mapped)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    input_ids: np.ndarray  # int [M, L]
    attention_mask: np.ndarray  # int [M, L]
    txt2img: np.ndarray  # int64 [M]

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_prepared(cls, prepared_dir: str | Path, split: str) -> "RetrievalSplit":
        """Read ``<prepared_dir>/<split>/`` as written by the preprocess stage (validated by PairDataset)."""
        from dmp_core.training.dataset import PairDataset

        dataset = PairDataset(prepared_dir, split)  # checks files, caption ids, every image captioned
        folder = dataset.split_dir
        return cls(
            images=np.load(folder / "images.npy", mmap_mode="r"),
            input_ids=np.load(folder / "tokens.npy", mmap_mode="r"),
            attention_mask=np.load(folder / "attention_mask.npy", mmap_mode="r"),
            txt2img=np.asarray(dataset.txt2img, dtype=np.int64),
        )

    def subset(self, n_images: int) -> "RetrievalSplit":
        """The first ``n_images`` images and all of their captions."""
        keep = np.flatnonzero(self.txt2img < n_images)
        return RetrievalSplit(
            images=np.asarray(self.images[:n_images]),
            input_ids=np.asarray(self.input_ids[keep]),
            attention_mask=np.asarray(self.attention_mask[keep]),
            txt2img=self.txt2img[keep],
        )


def as_retrieval_split(dataset: Any) -> RetrievalSplit:
    """A RetrievalSplit as is; a PairDataset (anything with ``prepared_dir`` and ``split``) read from disk."""
    if isinstance(dataset, RetrievalSplit):
        return dataset
    if hasattr(dataset, "prepared_dir") and hasattr(dataset, "split"):
        return RetrievalSplit.from_prepared(dataset.prepared_dir, dataset.split)
    raise DataError(f"{type(dataset).__name__}: not a retrieval split (expected RetrievalSplit or PairDataset)")


# ------------------------------------------------------------------------ scoring
@dataclass
class EncodedSplit:
    image_states: torch.Tensor  # [N, 1+P, Dv]
    image_emb: torch.Tensor  # [N, E], L2-normalised
    text_states: torch.Tensor  # [M, L, Dt]
    text_mask: torch.Tensor  # [M, L]
    text_emb: torch.Tensor  # [M, E]


@torch.inference_mode()
def encode_split(model: torch.nn.Module, data: RetrievalSplit, batch_size: int, device: torch.device | str) -> EncodedSplit:
    """Run both towers over every image and caption once (kept on ``device``)."""
    device = torch.device(device)
    image_states, image_emb = [], []
    for start in range(0, data.n_images, batch_size):
        batch = torch.from_numpy(np.array(data.images[start : start + batch_size]))  # a writable copy
        batch = batch.permute(0, 3, 1, 2).to(device)  # [B, 3, H, W] uint8
        states = model.encode_image(model.preprocess(batch))
        image_states.append(states.float())
        image_emb.append(model.image_embed(states).float())
    text_states, text_mask, text_emb = [], [], []
    for start in range(0, data.n_texts, batch_size):
        ids = torch.from_numpy(np.asarray(data.input_ids[start : start + batch_size], dtype=np.int64)).to(device)
        mask = torch.from_numpy(np.asarray(data.attention_mask[start : start + batch_size], dtype=np.int64)).to(device)
        states = model.encode_text(ids, mask)
        text_states.append(states.float())
        text_mask.append(mask)
        text_emb.append(model.text_embed(states, mask).float())
    return EncodedSplit(
        image_states=torch.cat(image_states),
        image_emb=torch.cat(image_emb),
        text_states=torch.cat(text_states),
        text_mask=torch.cat(text_mask),
        text_emb=torch.cat(text_emb),
    )


def itm_scores(
    model: torch.nn.Module, enc: EncodedSplit, image_idx: torch.Tensor, text_idx: torch.Tensor, itm_batch_size: int
) -> torch.Tensor:
    """ITM margins ``l1 - l0`` of the fused pairs (image_idx[p], text_idx[p]) (:func:`pair_scores`)."""
    return pair_scores(model, enc, image_idx, text_idx, itm_batch_size)[0]


@torch.inference_mode()
def pair_scores(
    model: torch.nn.Module, enc: EncodedSplit, image_idx: torch.Tensor, text_idx: torch.Tensor, itm_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITM margins ``l1 - l0``, re-ranking corrections r) of the fused pairs
    (image_idx[p], text_idx[p]) (:meth:`DMPModel.pair_scores`), in batches."""
    out = _fused_pairs(model, enc, image_idx, text_idx, itm_batch_size,
                       lambda joint, mask: model.pair_scores(joint, mask), widths=(1, 1))
    return out[0][:, 0], out[1][:, 0]


@torch.inference_mode()
def pair_states(
    model: torch.nn.Module, enc: EncodedSplit, image_idx: torch.Tensor, text_idx: torch.Tensor, itm_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused pair states [P, D] float32, ITM margins [P]) of the pairs (image_idx[p],
    text_idx[p]): what the re-ranking head reads (:meth:`DMPModel.pair_state`), kept so
    that the head can be refitted on them without fusing again (:mod:`rerank_fit`)."""
    def states(joint: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = model.pair_state(joint, mask)
        logits = model.itm_head(state)
        return state, (logits[:, 1] - logits[:, 0])[:, None]

    dim = model.pair_state_dim
    out = _fused_pairs(model, enc, image_idx, text_idx, itm_batch_size, states, widths=(dim, 1))
    return out[0], out[1][:, 0]


def _fused_pairs(model: torch.nn.Module, enc: EncodedSplit, image_idx: torch.Tensor, text_idx: torch.Tensor,
                 itm_batch_size: int, read, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """Fuse the pairs (image_idx[p], text_idx[p]) in batches and collect ``read(joint,
    mask)``'s outputs (one [B] or [B, w] tensor per entry of ``widths``) as float32 [P, w].

    Pairs are grouped by caption length and each batch is cut to its longest caption: with
    the additive padding mask, padding never changes a real token's state, so this only
    saves the fusion work on padding (captions average ~14 of 32 tokens here)."""
    outs = [torch.empty(len(image_idx), w, dtype=torch.float32) for w in widths]
    if len(image_idx) == 0:
        return outs
    dtype = next(model.parameters()).dtype
    lengths = enc.text_mask.sum(dim=1).cpu()
    order = torch.argsort(lengths[text_idx.cpu()], descending=True, stable=True)
    for start in range(0, len(order), itm_batch_size):
        rows = order[start : start + itm_batch_size]
        im = image_idx[rows].to(enc.image_states.device)
        tx = text_idx[rows].to(enc.text_states.device)
        width = int(lengths[tx.cpu()].max())
        mask = enc.text_mask[tx, :width]
        joint = model.fuse(enc.image_states[im].to(dtype), enc.text_states[tx, :width].to(dtype), mask)
        for out, value in zip(outs, read(joint, mask)):
            out[rows] = value.float().reshape(len(rows), -1).cpu()
    return outs


def itc_similarity(enc: EncodedSplit, chunk_size: int = 1024) -> np.ndarray:
    """``img_emb @ txt_emb.T`` as float32 [images, texts], ``chunk_size`` image rows at a time
    (in float32 also inside a bf16 autocast region: ranks must not depend on the AMP setting)."""
    sim = np.empty((enc.image_emb.shape[0], enc.text_emb.shape[0]), dtype=np.float32)
    with torch.inference_mode(), torch.autocast(enc.image_emb.device.type, enabled=False):
        for start in range(0, sim.shape[0], chunk_size):
            sim[start : start + chunk_size] = (enc.image_emb[start : start + chunk_size] @ enc.text_emb.T).cpu().numpy()
    return sim


@dataclass
class Candidates:
    """Every query's ITC top-``k`` and the fused scores of each (query, candidate) pair.

    ``i2t_top`` [images, k] holds text ids and ``t2i_top`` [texts, k] image ids (k clipped
    to the number of texts / images), each row in ITC order (best first); ``*_margin`` the
    ITM margins and ``*_residual`` the re-ranking head's corrections at the same places;
    ``*_itc_rank`` [queries, candidates] every pair's dense ITC rank (computed once: every
    scorer keeps ITC's order outside the top-k). Every scorer of :data:`SCORERS` re-orders a
    prefix of these lists (:func:`scorer_matrices`)."""

    k: int
    i2t_top: np.ndarray
    t2i_top: np.ndarray
    i2t_margin: np.ndarray
    t2i_margin: np.ndarray
    i2t_residual: np.ndarray  # the re-ranking head's correction r at the same places
    t2i_residual: np.ndarray
    i2t_itc_rank: np.ndarray  # int32 [images, texts]
    t2i_itc_rank: np.ndarray  # int32 [texts, images]


# the scorers of the re-ranking stage (each on the ITC top-k), besides "itc" (ITC alone)
SCORERS = {
    "rerank": "w * ITC similarity / tau + the re-ranking head's correction (residual listwise; k and w chosen on val)",
    "itm": "ITM margin alone (ALBEF, the seed)",
    "itm_itc": "ITM margin + ITC similarity (BLIP)",
}


def rerank_candidates(model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, k_test: int,
                      itm_batch_size: int, chunk_size: int = 1024) -> Candidates:
    """The ITC top-``k_test`` of every image and caption query (:func:`candidate_pairs`),
    with their ITM margins and re-ranking corrections; each distinct pair is fused once."""
    pairs = candidate_pairs(sim_i2t, k_test, chunk_size)
    n_texts = sim_i2t.shape[1]
    margins, residuals = pair_scores(model, enc, pairs.unique // n_texts, pairs.unique % n_texts, itm_batch_size)
    return pairs.candidates(sim_i2t, margins.numpy(), residuals.numpy())


@dataclass
class CandidatePairs:
    """Every query's ITC top-``k`` as pairs: ``unique`` image * n_texts + text ids of the
    distinct (image, text) pairs, and ``inverse`` mapping the i2t candidates (row-major,
    [images, k_i2t]) then the t2i candidates ([texts, k_t2i]) onto them."""

    k: int
    i2t_top: torch.Tensor  # [images, k_i2t] text ids, best first
    t2i_top: torch.Tensor  # [caption queries, k_t2i] image ids
    unique: torch.Tensor
    inverse: torch.Tensor
    t2i_texts: Optional[torch.Tensor] = None  # the caption queries of t2i_top's rows (None: every caption)

    def candidates(self, sim_i2t: np.ndarray, margins: np.ndarray, residuals: np.ndarray) -> "Candidates":
        """:class:`Candidates` from per-unique-pair margins and corrections (every caption a query)."""
        if self.t2i_texts is not None:
            raise ValueError("candidates: these pairs have a subset of the caption queries; scoring needs all")
        n_images, n_texts = sim_i2t.shape
        n = self.i2t_top.numel()
        margins, residuals = margins[self.inverse.numpy()], residuals[self.inverse.numpy()]
        k_i2t, k_t2i = self.i2t_top.shape[1], self.t2i_top.shape[1]
        return Candidates(k=self.k, i2t_top=self.i2t_top.numpy(), t2i_top=self.t2i_top.numpy(),
                          i2t_margin=margins[:n].reshape(n_images, k_i2t),
                          t2i_margin=margins[n:].reshape(n_texts, k_t2i),
                          i2t_residual=residuals[:n].reshape(n_images, k_i2t),
                          t2i_residual=residuals[n:].reshape(n_texts, k_t2i),
                          i2t_itc_rank=_dense_rank_desc(sim_i2t), t2i_itc_rank=_dense_rank_desc(sim_i2t.T))


def candidate_pairs(sim_i2t: np.ndarray, k: int, chunk_size: int = 1024,
                    text_queries: Optional[np.ndarray] = None) -> CandidatePairs:
    """The ITC top-``k`` of every image query and of every caption query (``text_queries``:
    only these captions; None: all), among the whole split (k clipped to it), a pair that is
    a candidate in both directions listed once; ``chunk_size`` queries at a time."""
    n_images, n_texts = sim_i2t.shape
    sim = torch.from_numpy(sim_i2t)
    k_i2t, k_t2i = min(k, n_texts), min(k, n_images)  # clipped to the split
    texts = torch.arange(n_texts) if text_queries is None else torch.as_tensor(text_queries, dtype=torch.int64)
    i2t_top = torch.cat([sim[s : s + chunk_size].topk(k_i2t, dim=1).indices for s in range(0, n_images, chunk_size)])
    t2i_top = torch.cat([sim[:, texts[s : s + chunk_size]].T.topk(k_t2i, dim=1).indices
                         for s in range(0, len(texts), chunk_size)] or [torch.zeros(0, k_t2i, dtype=torch.int64)])
    i2t_pairs = torch.arange(n_images).repeat_interleave(k_i2t) * n_texts + i2t_top.reshape(-1)
    t2i_pairs = t2i_top.reshape(-1) * n_texts + texts.repeat_interleave(k_t2i)
    unique, inverse = torch.unique(torch.cat([i2t_pairs, t2i_pairs]), return_inverse=True)
    return CandidatePairs(k=k, i2t_top=i2t_top, t2i_top=t2i_top, unique=unique, inverse=inverse,
                          t2i_texts=None if text_queries is None else texts)


def scorer_matrices(cands: Candidates, sim_i2t: np.ndarray, scorer: str, *, k: Optional[int] = None,
                    itc_weight: float = 1.0, tau: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(i2t [images, texts], t2i [texts, images]) of ``scorer`` on each query's ITC top-``k``
    (default: all of ``cands``). Every other pair scores below every candidate (from
    ``NOT_RERANKED``, or lower where a candidate's score reaches it, down) and keeps ITC's
    order among the rest: re-ranking only re-orders the top k, and a gold pair outside it
    keeps its ITC rank (>= k; with k >= 10, R@1/5/10 equal those of ALBEF's ``-100``).

    * ``rerank``: ``itc_weight * s / tau + r`` (r: the re-ranking head's correction) -- with
      the head at zero exactly ITC's order;
    * ``itm``: ``m``, the ITM margin alone (ALBEF, the seed's protocol);
    * ``itm_itc``: ``m + s`` (BLIP's ``score + topk_sim``)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r} (one of {', '.join(SCORERS)})")
    k = cands.k if k is None else k
    out = []
    for top, margin, residual, itc_rank, transpose in (
            (cands.i2t_top, cands.i2t_margin, cands.i2t_residual, cands.i2t_itc_rank, False),
            (cands.t2i_top, cands.t2i_margin, cands.t2i_residual, cands.t2i_itc_rank, True)):
        top, margin, residual = top[:, :k], margin[:, :k].astype(np.float64), residual[:, :k].astype(np.float64)
        rows = np.arange(itc_rank.shape[0])[:, None]
        s = (sim_i2t[top, rows] if transpose else sim_i2t[rows, top]).astype(np.float64)
        score = {"rerank": itc_weight * s / tau + residual, "itm": margin, "itm_itc": margin + s}[scorer]
        floor = min(NOT_RERANKED, float(score.min()) - 1.0) if score.size else NOT_RERANKED
        matrix = (floor - itc_rank).astype(np.float32)  # the rest, in ITC's order
        matrix[rows, top] = score.astype(np.float32)
        out.append(matrix)
    return out[0], out[1]


def _dense_rank_desc(scores: np.ndarray) -> np.ndarray:
    """Per row, 0 for the highest value, 1 for the next distinct one ... (ties share a rank)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=1)
    steps = np.concatenate([np.zeros((scores.shape[0], 1), dtype=np.int64),
                            np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1)], axis=1)
    dense = np.empty(scores.shape, dtype=np.int32)
    np.put_along_axis(dense, order, steps.astype(np.int32), axis=1)
    return dense


def rerank(
    model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, k_test: int, itm_batch_size: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The seed's re-ranking (ALBEF): ITM margins on the top-``k_test`` ITC candidates of every
    query; below ``-100`` elsewhere. Returns (i2t [images, texts], t2i [texts, images])."""
    cands = rerank_candidates(model, enc, sim_i2t, k_test, itm_batch_size, chunk_size)
    return scorer_matrices(cands, sim_i2t, "itm")


def exhaustive_itm(model: torch.nn.Module, enc: EncodedSplit, itm_batch_size: int) -> np.ndarray:
    """ITM scores of *every* (image, text) pair, [images, texts] (the slow reference)."""
    n_images, n_texts = enc.image_emb.shape[0], enc.text_emb.shape[0]
    images = torch.arange(n_images).repeat_interleave(n_texts)
    texts = torch.arange(n_texts).repeat(n_images)
    return itm_scores(model, enc, images, texts, itm_batch_size).numpy().reshape(n_images, n_texts)


def compute_scores(
    model: torch.nn.Module,
    dataset: Any,
    k_test: int,
    batch_size: int,
    itm_batch_size: int,
    device: torch.device | str = "cpu",
    chunk_size: int = 1024,
    *,
    k: Optional[int] = None,
    itc_weight: float = 1.0,
    tau: float = 0.05,
) -> dict[str, np.ndarray]:
    """Score matrices of one split: ``itc_i2t``/``itc_t2i``, the headline ``i2t``/``t2i``
    (the residual re-ranker on the top ``k`` (default ``k_test``) with ``itc_weight`` and
    ``tau``), the seed's ``itm_i2t``/``itm_t2i`` (ITM margin alone on the top ``k_test``)
    and BLIP's ``itm_itc_i2t``/``itm_itc_t2i``, plus ``txt2img``. ``k_test`` is clipped to
    the split size."""
    data = as_retrieval_split(dataset)
    was_training = model.training
    model.eval()
    try:
        enc = encode_split(model, data, batch_size, device)
        itc_i2t = itc_similarity(enc, chunk_size)
        cands = rerank_candidates(model, enc, itc_i2t, k_test, itm_batch_size, chunk_size)
    finally:
        model.train(was_training)
    out = {"itc_i2t": itc_i2t, "itc_t2i": np.ascontiguousarray(itc_i2t.T),
           "txt2img": np.asarray(data.txt2img, dtype=np.int64)}
    out["i2t"], out["t2i"] = scorer_matrices(cands, itc_i2t, "rerank", k=k, itc_weight=itc_weight, tau=tau)
    out["itm_i2t"], out["itm_t2i"] = scorer_matrices(cands, itc_i2t, "itm")
    out["itm_itc_i2t"], out["itm_itc_t2i"] = scorer_matrices(cands, itc_i2t, "itm_itc")
    return out


# score-matrix keys of each scorer in a compute_scores result (the headline carries no prefix)
SCORE_KEYS = {"rerank": ("i2t", "t2i"), "itm": ("itm_i2t", "itm_t2i"), "itm_itc": ("itm_itc_i2t", "itm_itc_t2i"),
              "itc": ("itc_i2t", "itc_t2i")}


def metrics_from_scores(scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``<scorer>_*`` metrics (``rerank_r_mean``, ``itm_r_mean``, ``itc_tr_r1`` ...) of every
    scorer present in a ``compute_scores`` result."""
    txt2img = np.asarray(scores["txt2img"])
    img2txt = img2txt_from_txt2img(txt2img, scores["itc_i2t"].shape[0])
    out: dict[str, float] = {}
    for prefix, (i2t, t2i) in SCORE_KEYS.items():
        if i2t not in scores:
            continue
        for key, value in retrieval_metrics(scores[i2t], scores[t2i], txt2img, img2txt).items():
            out[f"{prefix}_{key}"] = value
    return out


def choose_rerank(cands: Candidates, sim_i2t: np.ndarray, txt2img: np.ndarray, ks: Sequence[int],
                  itc_weights: Sequence[float], tau: float) -> dict[str, Any]:
    """The residual re-ranker's ``k`` and ITC weight with the best R mean on this split (the
    val split: the test split never chooses anything). Ties keep the first in ``ks`` x
    ``itc_weights`` order. Returns ``{"k", "itc_weight", "r_mean", "itc_r_mean", "grid"}``,
    ``grid`` holding the R mean of every pair ``"k=<k> w=<w>"``."""
    txt2img = np.asarray(txt2img, dtype=np.int64)
    img2txt = img2txt_from_txt2img(txt2img, sim_i2t.shape[0])
    grid: dict[str, float] = {}
    best: Optional[tuple[float, int, float]] = None
    for k in ks:
        for w in itc_weights:
            i2t, t2i = scorer_matrices(cands, sim_i2t, "rerank", k=k, itc_weight=w, tau=tau)
            r = retrieval_metrics(i2t, t2i, txt2img, img2txt)["r_mean"]
            grid[f"k={k} w={w:g}"] = round(r, 4)
            if best is None or r > best[0]:
                best = (r, k, w)
    itc = retrieval_metrics(sim_i2t, sim_i2t.T, txt2img, img2txt)["r_mean"]
    return {"k": best[1], "itc_weight": best[2], "r_mean": best[0], "itc_r_mean": itc, "grid": grid}


# ------------------------------------------------------------------ model loading
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_vocab_size(prepared_dir: str | Path) -> int:
    from dmp_core.training.dataset import read_meta

    try:
        return int(read_meta(prepared_dir)["vocab_size"])
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{Path(prepared_dir) / 'meta.json'}: no integer 'vocab_size' ({err.__class__.__name__})") from None


def load_model(cfg: Config, weights: str | Path, vocab_size: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the configured DMPModel (without downloading/pretrained init) and load ``weights``."""
    from dmp_core.models import load_weights, model_from_config

    model = model_from_config(cfg, vocab_size, pretrained=False)
    load_weights(model, weights, missing_hint="run the training stage first")
    return model.to(device).eval()


# ------------------------------------------------------------------------ MLflow
