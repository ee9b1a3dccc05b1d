"""Diagnostics that say whether the fused model uses both modalities.

A retrieval number is only as good as the component behind it: an ITM head at its class
prior makes re-ranked recall noise, and a fusion that ignores the image makes "MLM
conditioned on the image" plain language modelling. Three measurements, each on the
evaluated split, each a difference the model can only produce by using a modality:

* **ITM AUC** (:func:`itm_auc`): per query, the ROC-AUC of the ITM margin (l1 - l0) over
  exactly the candidates re-ranking orders (the query's ITC top-k, gold among them),
  averaged over queries in both directions; beside it the same against random negatives
  (does ITM match at all?). 0.5 = the head cannot order them.
* **image-use gap** (:func:`image_use_gap`): MLM loss (nats per masked token) with
  shuffled images minus with the matching images, same captions and same masks. 0 = the
  masked-token predictions ignore the image.
* **text-use gap** (:func:`text_use_gap`): MIM loss with shuffled captions minus with the
  matching captions, same images and masks, for models with a MIM head. 0 = the patch
  reconstructions ignore the text. For MAMO's momentum target the EMA teacher is not
  saved with the model; the online image tower's features of the clean image stand in
  for it (the gap is a difference of two losses against the same target).

Pairs and masks are drawn with a fixed generator, so the numbers are deterministic.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from dmp_core.evaluation.retrieval import EncodedSplit, RetrievalSplit, itm_scores


def _query_images(n_images: int, count: int) -> np.ndarray:
    """``count`` image indices spread evenly over the split (all when it is smaller)."""
    return np.unique(np.linspace(0, n_images - 1, num=min(count, n_images)).round().astype(np.int64))


def _query_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC of one query's candidates: P(score of a positive > score of a negative),
    ties counted half (the Mann-Whitney statistic)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _row_keys(input_ids: Optional[np.ndarray], n: int) -> list:
    """One hashable key per caption (its token ids), or each caption's index when unknown."""
    if input_ids is None:
        return list(range(n))
    return [np.asarray(row).tobytes() for row in input_ids]


def bootstrap_mean(values: np.ndarray, *, n_samples: int = 1000, seed: int = 0, level: float = 0.95
                   ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (queries resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_samples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@torch.inference_mode()
def itm_auc(model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, txt2img: np.ndarray, *, k: int,
            n_queries: int, itm_batch_size: int = 256, input_ids: Optional[np.ndarray] = None,
            seed: int = 0) -> dict[str, float]:
    """Per-query ITM AUCs, each averaged over queries, with a bootstrap interval over queries.

    * ``itm_auc`` -- what re-ranking needs: for each query (``n_queries`` images and
      ``n_queries`` captions spread over the split), the ROC-AUC of the ITM margin (l1 - l0)
      over exactly the candidates re-ranking orders, the query's ITC top-``k``: gold
      candidates (label 1) against the others (label 0). Queries whose top-k holds no gold
      or only gold have no order to fix and are left out (``n_auc_queries`` counts the
      rest). The mean of the image->text and text->image query AUCs (each also reported).
    * ``itm_auc_random`` -- does ITM match at all: each query image's gold captions
      against ``k`` captions of other images drawn at random (fixed ``seed``).

    With the split's token ids ``input_ids`` [T, L], a candidate caption identical to one of
    the query's gold captions (the synthetic set repeats captions across images) is a true
    match by construction: it is left out of the negatives (``n_auc_identical`` counts
    them), in both directions. 0.5 = the head cannot order the candidates."""
    txt2img = np.asarray(txt2img)
    n_images, n_texts = sim_i2t.shape
    keys = _row_keys(input_ids, n_texts)
    images_of_key: dict[Any, set] = {}
    for t, key in enumerate(keys):
        images_of_key.setdefault(key, set()).add(int(txt2img[t]))
    rng = np.random.default_rng(seed)
    # (kind, query) -> list of (image, text, label); kind: i2t | t2i | random
    queries: list[tuple[str, list[tuple[int, int, int]]]] = []
    identical = 0
    for i in _query_images(n_images, n_queries):
        gold_keys = {keys[g] for g in np.flatnonzero(txt2img == i)}
        top = np.argsort(-sim_i2t[i], kind="stable")[:k]
        cands = []
        for t in top:
            if txt2img[t] != i and keys[t] in gold_keys:
                identical += 1
                continue
            cands.append((int(i), int(t), int(txt2img[t] == i)))
        queries.append(("i2t", cands))
        others = np.flatnonzero((txt2img != i) & np.array([key not in gold_keys for key in keys]))
        drawn = rng.choice(others, size=min(k, len(others)), replace=False) if len(others) else []
        queries.append(("random", [(int(i), int(g), 1) for g in np.flatnonzero(txt2img == i)]
                        + [(int(i), int(t), 0) for t in drawn]))
    for t in _query_images(n_texts, n_queries):
        gold = int(txt2img[t])
        top = np.argsort(-sim_i2t[:, t], kind="stable")[:k]
        cands = []
        for i in top:
            if i != gold and int(i) in images_of_key[keys[t]]:
                identical += 1
                continue
            cands.append((int(i), int(t), int(i == gold)))
        queries.append(("t2i", cands))
    flat = [pair for _, cands in queries for pair in cands]
    scores = itm_scores(model, enc, torch.tensor([p[0] for p in flat]), torch.tensor([p[1] for p in flat]),
                        itm_batch_size).numpy() if flat else np.zeros(0)
    per_kind: dict[str, list[float]] = {"i2t": [], "t2i": [], "random": []}
    pos = 0
    for kind, cands in queries:
        labels = np.asarray([p[2] for p in cands], dtype=np.int64)
        s = scores[pos:pos + len(cands)]
        pos += len(cands)
        if 0 < labels.sum() < len(labels):
            per_kind[kind].append(_query_auc(s, labels))
    topk = np.asarray(per_kind["i2t"] + per_kind["t2i"])
    random = np.asarray(per_kind["random"])
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    lo, hi = bootstrap_mean(topk, seed=seed)
    rlo, rhi = bootstrap_mean(random, seed=seed)
    return {"itm_auc": mean(topk), "itm_auc_lo": lo, "itm_auc_hi": hi,
            "itm_auc_i2t": mean(per_kind["i2t"]), "itm_auc_t2i": mean(per_kind["t2i"]),
            "itm_auc_random": mean(random), "itm_auc_random_lo": rlo, "itm_auc_random_hi": rhi,
            "n_auc_queries": int(len(topk)), "n_auc_pairs": int(len(flat)), "n_auc_identical": identical}


def rerank_moves(itc_ranks: tuple[np.ndarray, np.ndarray], reranked_ranks: tuple[np.ndarray, np.ndarray], k: int,
                 prefix: str = "rerank") -> dict[str, int]:
    """What re-ranking did to each query whose gold lies in its ITC top-``k`` (the only ones it
    can move): the gold moved up, down or stayed, and the net promotions (up - down).

    ``itc_ranks`` and ``reranked_ranks`` are (text-retrieval ranks [images], image-retrieval
    ranks [texts]) of the same split (0-based, :func:`retrieval_ranks`). R@1 depends on the
    head of the list, which an AUC over the top-k does not see: these counts do."""
    itc = np.concatenate([np.asarray(r) for r in itc_ranks])
    moved = np.concatenate([np.asarray(r) for r in reranked_ranks])
    inside = itc < k
    up, down = int(((moved < itc) & inside).sum()), int(((moved > itc) & inside).sum())
    return {f"{prefix}_up": up, f"{prefix}_down": down, f"{prefix}_same": int(inside.sum()) - up - down,
            f"{prefix}_net": up - down, f"{prefix}_queries": int(inside.sum())}


def _pairs(data: RetrievalSplit, n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images spread over the split, the first caption of each, and a derangement of the
    images (shifted by half the list, so a shuffled image is far from its own, e.g. not a
    member of the same synthetic binding group)."""
    images = _query_images(data.n_images, n_pairs)
    if len(images) < 2:
        raise ValueError("modality-use gaps need at least two images")
    first_caption = {}
    for t, i in enumerate(np.asarray(data.txt2img).tolist()):
        first_caption.setdefault(i, t)
    captions = np.asarray([first_caption[int(i)] for i in images])
    shuffled = np.roll(images, len(images) // 2)
    return images, captions, shuffled


def _load(data: RetrievalSplit, images: np.ndarray, captions: np.ndarray, device: torch.device):
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(data.images[images]).transpose(0, 3, 1, 2))).to(device)
    ids = torch.from_numpy(np.asarray(data.input_ids[captions], dtype=np.int64)).to(device)
    mask = torch.from_numpy(np.asarray(data.attention_mask[captions], dtype=np.int64)).to(device)
    return img, ids, mask


@torch.inference_mode()
def image_use_gap(model: torch.nn.Module, data: RetrievalSplit, *, n_pairs: int, mask_ratio: float, special: Any,
                  seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """MLM loss of F(shuffled image, masked text) minus F(matching image, masked text)."""
    from dmp_core.losses import mlm_loss
    from dmp_core.losses.masking import IGNORE_INDEX, mask_text

    device = next(model.parameters()).device
    images, captions, shuffled = _pairs(data, n_pairs)
    gen = torch.Generator().manual_seed(seed)
    sums = {"matched": 0.0, "shuffled": 0.0}
    count = 0
    for lo in range(0, len(images), batch_size):
        sl = slice(lo, lo + batch_size)
        img, ids, attn = _load(data, images[sl], captions[sl], device)
        other = _load(data, shuffled[sl], captions[sl], device)[0]
        masked, labels = mask_text(ids, attn, mask_ratio, special=special, vocab_size=model.vocab_size,
                                   generator=gen)
        text = model.encode_text(masked, attn)
        selected = labels != IGNORE_INDEX
        n_tokens = int(selected.sum())
        for name, pixels in (("matched", img), ("shuffled", other)):
            joint = model.fuse(model.encode_image(model.preprocess(pixels)), text, attn)
            logits = model.mlm_logits(model.layout.tokens(joint)[selected])
            sums[name] += float(mlm_loss(logits, labels[selected])) * n_tokens
        count += n_tokens
    matched, shuffled_loss = sums["matched"] / count, sums["shuffled"] / count
    return {"image_use_gap": shuffled_loss - matched, "mlm_loss_matched": matched,
            "mlm_loss_shuffled": shuffled_loss, "n_pairs": int(len(images))}


@torch.inference_mode()
def text_use_gap(model: torch.nn.Module, data: RetrievalSplit, cfg: Any, *, n_pairs: int, mask_ratio: float,
                 seed: int = 0, batch_size: int = 64) -> dict[str, Optional[float]]:
    """MIM loss of F(masked image, shuffled caption) minus F(masked image, matching caption);
    all None when the model has no MIM head."""
    if getattr(model, "mim_head", None) is None:
        return {"text_use_gap": None, "mim_loss_matched": None, "mim_loss_shuffled": None}
    from dmp_core.losses import mim_loss
    from dmp_core.losses.masking import image_block_mask
    from dmp_core.targets import mim_targets

    kind = cfg.objective.resolve().mim_target
    device = next(model.parameters()).device
    images, captions, _ = _pairs(data, n_pairs)
    shuffled_captions = np.roll(captions, len(captions) // 2)
    gen = torch.Generator().manual_seed(seed)
    sums = {"matched": 0.0, "shuffled": 0.0}
    count = 0
    for lo in range(0, len(images), batch_size):
        sl = slice(lo, lo + batch_size)
        img, ids, attn = _load(data, images[sl], captions[sl], device)
        _, other_ids, other_attn = _load(data, images[sl], shuffled_captions[sl], device)
        pixels = model.preprocess(img)
        patch_mask = image_block_mask(len(img), model.grid_size, mask_ratio, block=model.mask_block, generator=gen,
                                      device=device)
        masked_states = model.encode_image(pixels, patch_mask)
        if kind == "momentum":
            target = model.encode_image(pixels)[:, 1:]
        else:
            target = mim_targets(cfg, kind, img, model.pixel_mean, model.pixel_std)
        for name, (t_ids, t_attn) in (("matched", (ids, attn)), ("shuffled", (other_ids, other_attn))):
            joint = model.fuse(masked_states, model.encode_text(t_ids, t_attn), t_attn)
            loss = mim_loss(model.mim_predictions(joint), target, patch_mask, kind)
            sums[name] += float(loss) * len(img)
        count += len(img)
    matched, shuffled_loss = sums["matched"] / count, sums["shuffled"] / count
    return {"text_use_gap": shuffled_loss - matched, "mim_loss_matched": matched, "mim_loss_shuffled": shuffled_loss}


def modality_gaps(model: torch.nn.Module, data: RetrievalSplit, cfg: Any, special: Any) -> dict[str, Any]:
    """Image-use and text-use gaps (eval.diag_pairs pairs) at the common mask ratios
    ``eval.gap_text_mask_ratio`` / ``eval.gap_image_mask_ratio``, the same for every variant
    (each variant trains with its own ratios, and a loss measured at another ratio is
    another quantity), each also relative to its matched loss (``*_rel``)."""
    n_pairs = cfg.eval.diag_pairs
    out: dict[str, Any] = image_use_gap(model, data, n_pairs=n_pairs, mask_ratio=cfg.eval.gap_text_mask_ratio,
                                        special=special, seed=cfg.seed)
    out.update(text_use_gap(model, data, cfg, n_pairs=n_pairs, mask_ratio=cfg.eval.gap_image_mask_ratio,
                            seed=cfg.seed))
    for name, matched in (("image_use_gap", "mlm_loss_matched"), ("text_use_gap", "mim_loss_matched")):
        gap, base = out.get(name), out.get(matched)
        out[f"{name}_rel"] = gap / base if gap is not None and base else None
    return out
