"""Image-text retrieval evaluation in the ALBEF protocol (METHOD.md section 6).

1. Encode every image and every caption of the split once.
2. ITC similarity ``S = img_emb @ txt_emb.T`` for all pairs (computed in row chunks).
3. For each image, its top-``k_test`` captions by ``S`` are re-scored with the ITM
   match logit of the fused pair; every other entry gets ``-100``. The same for
   each caption over images.
4. Text retrieval rank of an image = best rank among its gold captions; image
   retrieval rank of a caption = rank of its image. ``R@K = 100 * mean(rank < K)``.

Both the re-ranked (``itm_*``) and the ITC-only (``itc_*``) metrics are reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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


@torch.inference_mode()
def itm_scores(
    model: torch.nn.Module, enc: EncodedSplit, image_idx: torch.Tensor, text_idx: torch.Tensor, itm_batch_size: int
) -> torch.Tensor:
    """ITM match logits (column 1) of the fused pairs (image_idx[p], text_idx[p]), in batches.

    Pairs are grouped by caption length and each batch is cut to its longest caption: with
    the additive padding mask, padding never changes a real token's state, so this only
    saves the fusion work on padding (captions average ~14 of 32 tokens here)."""
    out = torch.empty(len(image_idx), dtype=torch.float32)
    if len(image_idx) == 0:
        return out
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
        out[rows] = model.itm_logits(joint, mask)[:, 1].float().cpu()
    return out


def itc_similarity(enc: EncodedSplit, chunk_size: int = 1024) -> np.ndarray:
    """``img_emb @ txt_emb.T`` as float32 [images, texts], ``chunk_size`` image rows at a time
    (in float32 also inside a bf16 autocast region: ranks must not depend on the AMP setting)."""
    sim = np.empty((enc.image_emb.shape[0], enc.text_emb.shape[0]), dtype=np.float32)
    with torch.inference_mode(), torch.autocast(enc.image_emb.device.type, enabled=False):
        for start in range(0, sim.shape[0], chunk_size):
            sim[start : start + chunk_size] = (enc.image_emb[start : start + chunk_size] @ enc.text_emb.T).cpu().numpy()
    return sim


def rerank(
    model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, k_test: int, itm_batch_size: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """ITM scores on the top-``k_test`` ITC candidates of every query; ``-100`` elsewhere.

    Returns (i2t [images, texts], t2i [texts, images]). A pair that is a candidate in both
    directions (every gold pair of a good model) is fused once. Candidates are chosen
    ``chunk_size`` queries at a time."""
    n_images, n_texts = sim_i2t.shape
    sim = torch.from_numpy(sim_i2t)
    pair_ids = []  # image * n_texts + text
    k = min(k_test, n_texts)
    for start in range(0, n_images, chunk_size):
        top = sim[start : start + chunk_size].topk(k, dim=1).indices  # [c, k] texts
        images = torch.arange(start, start + len(top)).repeat_interleave(k)
        i2t_pairs = images * n_texts + top.reshape(-1)
        pair_ids.append(i2t_pairs)
    n_i2t = sum(len(p) for p in pair_ids)
    k = min(k_test, n_images)
    for start in range(0, n_texts, chunk_size):
        top = sim[:, start : start + chunk_size].T.topk(k, dim=1).indices  # [c, k] images
        texts = torch.arange(start, start + len(top)).repeat_interleave(k)
        pair_ids.append(top.reshape(-1) * n_texts + texts)
    all_pairs = torch.cat(pair_ids)
    unique, inverse = torch.unique(all_pairs, return_inverse=True)
    scores = itm_scores(model, enc, unique // n_texts, unique % n_texts, itm_batch_size)[inverse].numpy()

    i2t = np.full((n_images, n_texts), NOT_RERANKED, dtype=np.float32)
    t2i = np.full((n_texts, n_images), NOT_RERANKED, dtype=np.float32)
    pairs = all_pairs.numpy()
    img, txt = pairs // n_texts, pairs % n_texts
    i2t[img[:n_i2t], txt[:n_i2t]] = scores[:n_i2t]
    t2i[txt[n_i2t:], img[n_i2t:]] = scores[n_i2t:]
    return i2t, t2i


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
) -> dict[str, np.ndarray]:
    """Score matrices of one split: ``itc_i2t``/``itc_t2i`` and re-ranked ``i2t``/``t2i``,
    plus ``txt2img``. ``k_test`` is clipped to the split size."""
    data = as_retrieval_split(dataset)
    was_training = model.training
    model.eval()
    try:
        enc = encode_split(model, data, batch_size, device)
        itc_i2t = itc_similarity(enc, chunk_size)
        i2t, t2i = rerank(model, enc, itc_i2t, k_test, itm_batch_size, chunk_size)
    finally:
        model.train(was_training)
    return {
        "i2t": i2t,
        "t2i": t2i,
        "itc_i2t": itc_i2t,
        "itc_t2i": np.ascontiguousarray(itc_i2t.T),
        "txt2img": np.asarray(data.txt2img, dtype=np.int64),
    }


def metrics_from_scores(scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``itm_*`` (re-ranked) and ``itc_*`` metrics from a ``compute_scores`` result."""
    txt2img = np.asarray(scores["txt2img"])
    img2txt = img2txt_from_txt2img(txt2img, scores["i2t"].shape[0])
    out: dict[str, float] = {}
    for prefix, (i2t, t2i) in {"itm": ("i2t", "t2i"), "itc": ("itc_i2t", "itc_t2i")}.items():
        for key, value in retrieval_metrics(scores[i2t], scores[t2i], txt2img, img2txt).items():
            out[f"{prefix}_{key}"] = value
    return out


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
