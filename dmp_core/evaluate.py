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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from dmp_core.config import Config
from dmp_core.errors import DataError
from dmp_core.io import save_npz, write_json
from dmp_core.tracking import read_run_json, resolve_tracking_uri

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
        from dmp_core.data.dataset import PairDataset

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
        text_emb.append(model.text_embed(states).float())
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
    """ITM match logits (column 1) of the fused pairs (image_idx[p], text_idx[p]), in batches."""
    out = torch.empty(len(image_idx), dtype=torch.float32)
    dtype = next(model.parameters()).dtype
    for start in range(0, len(image_idx), itm_batch_size):
        im = image_idx[start : start + itm_batch_size].to(enc.image_states.device)
        tx = text_idx[start : start + itm_batch_size].to(enc.text_states.device)
        joint = model.fuse(enc.image_states[im].to(dtype), enc.text_states[tx].to(dtype), enc.text_mask[tx])
        out[start : start + len(im)] = model.itm_logits(joint)[:, 1].float().cpu()
    return out


def itc_similarity(enc: EncodedSplit, chunk_size: int = 1024) -> np.ndarray:
    """``img_emb @ txt_emb.T`` as float32 [images, texts], ``chunk_size`` image rows at a time."""
    sim = np.empty((enc.image_emb.shape[0], enc.text_emb.shape[0]), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, sim.shape[0], chunk_size):
            sim[start : start + chunk_size] = (enc.image_emb[start : start + chunk_size] @ enc.text_emb.T).cpu().numpy()
    return sim


def rerank(
    model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, k_test: int, itm_batch_size: int, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """ITM scores on the top-``k_test`` ITC candidates of every query; ``-100`` elsewhere.

    Returns (i2t [images, texts], t2i [texts, images]). Queries are handled
    ``chunk_size`` at a time so that only one chunk of candidate indices lives in memory.
    """
    n_images, n_texts = sim_i2t.shape
    i2t = np.full((n_images, n_texts), NOT_RERANKED, dtype=np.float32)
    t2i = np.full((n_texts, n_images), NOT_RERANKED, dtype=np.float32)
    sim = torch.from_numpy(sim_i2t)

    k = min(k_test, n_texts)
    for start in range(0, n_images, chunk_size):
        top = sim[start : start + chunk_size].topk(k, dim=1).indices  # [c, k] texts
        images = torch.arange(start, start + len(top)).repeat_interleave(k)
        scores = itm_scores(model, enc, images, top.reshape(-1), itm_batch_size)
        i2t[images.numpy(), top.reshape(-1).numpy()] = scores.numpy()

    k = min(k_test, n_images)
    for start in range(0, n_texts, chunk_size):
        top = sim[:, start : start + chunk_size].T.topk(k, dim=1).indices  # [c, k] images
        texts = torch.arange(start, start + len(top)).repeat_interleave(k)
        scores = itm_scores(model, enc, top.reshape(-1), texts, itm_batch_size)
        t2i[texts.numpy(), top.reshape(-1).numpy()] = scores.numpy()
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
    from dmp_core.data.dataset import read_meta

    try:
        return int(read_meta(prepared_dir)["vocab_size"])
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{Path(prepared_dir) / 'meta.json'}: no integer 'vocab_size' ({err.__class__.__name__})") from None


def load_model(cfg: Config, weights: str | Path, vocab_size: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the configured DMPModel (without downloading/pretrained init) and load ``weights``."""
    from dmp_core.models import create_model, load_weights

    model = create_model(cfg.model.model_copy(update={"pretrained": False}), image_size=cfg.data.image_size, vocab_size=vocab_size)
    load_weights(model, weights, missing_hint="run the training stage first")
    return model.to(device).eval()


# ------------------------------------------------------------------------ MLflow
def log_to_mlflow(cfg: Config, metrics: Mapping[str, Mapping[str, float]], reports_dir: str | Path, split: str) -> list[str]:
    """Add each model's metrics to its training run (id from ``reports/<stage>/run.json``).

    Returns one line per model saying what was done (printed by the stage)."""
    lines = []
    reports_dir = Path(reports_dir)
    for stage, values in metrics.items():
        run_json = reports_dir / stage / "run.json"
        if not run_json.is_file():
            lines.append(f"mlflow: {run_json} absent, {stage} metrics not logged to MLflow")
            continue
        run = read_run_json(run_json) or {}
        run_id = run.get("run_id")
        if not run_id:
            lines.append(f"mlflow: {run_json} has no run_id, {stage} metrics not logged to MLflow")
            continue
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.get("tracking_uri") or resolve_tracking_uri(cfg.tracking))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{split}_{k}", float(v), now, 0) for k, v in values.items()])
        lines.append(f"mlflow: logged {len(values)} {split} metrics to run {run_id} ({stage})")
    return lines


# ----------------------------------------------------------------------- the stage
def run_evaluate(
    cfg: Config,
    prepared_dir: str | Path,
    models: Mapping[str, str | Path],
    reports_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate each named model (e.g. ``{"pretrain": ..., "finetune": ...}``) on ``eval.split``.

    Writes ``<out_dir>/metrics.json`` (``{model: {itm_tr_r1: ..., itc_ir_r5: ...}}``) and
    ``<out_dir>/scores.npz``: the last model's matrices as ``i2t``, ``t2i``, ``itc_i2t``,
    ``itc_t2i``, every model's as ``<model>_i2t`` etc., and ``txt2img``.
    ``out_dir`` defaults to ``<reports_dir>/evaluate``; ``reports_dir`` also holds the
    ``<stage>/run.json`` files whose MLflow runs receive the metrics.
    """
    if not models:
        raise DataError("run_evaluate: no models to evaluate")
    device = torch.device(device) if device is not None else pick_device()
    out_dir = Path(out_dir) if out_dir is not None else Path(reports_dir) / "evaluate"
    data = RetrievalSplit.from_prepared(prepared_dir, cfg.eval.split)
    vocab_size = read_vocab_size(prepared_dir)
    torch.manual_seed(cfg.seed)

    metrics: dict[str, dict[str, float]] = {}
    arrays: dict[str, np.ndarray] = {}
    last: dict[str, np.ndarray] = {}
    for name, weights in models.items():
        model = load_model(cfg, weights, vocab_size, device)
        scores = compute_scores(
            model, data, cfg.eval.k_test, cfg.eval.batch_size, cfg.eval.itm_batch_size, device, chunk_size=cfg.eval.chunk_size
        )
        metrics[name] = metrics_from_scores(scores)
        for key in ("i2t", "t2i", "itc_i2t", "itc_t2i"):
            arrays[f"{name}_{key}"] = scores[key]
        last = scores
        del model
    arrays.update({key: last[key] for key in ("i2t", "t2i", "itc_i2t", "itc_t2i", "txt2img")})

    save_npz(out_dir / "scores.npz", **arrays)
    write_json(out_dir / "metrics.json", metrics)
    if log_mlflow:
        for line in log_to_mlflow(cfg, metrics, reports_dir, cfg.eval.split):
            print(line, flush=True)
    return metrics


def summary_line(metrics: Mapping[str, Mapping[str, float]]) -> Iterable[str]:
    for name, values in metrics.items():
        yield (
            f"{name}: ITM TR R@1/5/10 {values['itm_tr_r1']:.1f}/{values['itm_tr_r5']:.1f}/{values['itm_tr_r10']:.1f}"
            f"  IR {values['itm_ir_r1']:.1f}/{values['itm_ir_r5']:.1f}/{values['itm_ir_r10']:.1f}"
            f"  (ITC r_mean {values['itc_r_mean']:.1f})"
        )
