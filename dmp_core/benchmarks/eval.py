"""``dmp bench eval``: the ALBEF re-ranking protocol against exhaustive ITM scoring.

On the first ``subset`` images of the evaluation split (and all their captions) the
model is scored twice: ITC top-``k_test`` + ITM re-ranking (the evaluate stage), and
ITM on every (image, caption) pair. Both wall times and both sets of recall metrics
are returned, with the largest absolute R@K difference between them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmp_core.config import Config
from dmp_core.evaluation.retrieval import (
    RetrievalSplit,
    encode_split,
    exhaustive_itm,
    itc_similarity,
    load_model,
    metrics_from_scores,
    pick_device,
    read_vocab_size,
    rerank,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_eval(
    cfg: Config,
    subset: int = 100,
    checkpoint: str | Path | None = None,
    *,
    prepared_dir: str | Path = "data/prepared",
    device: str | torch.device | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Time re-ranked vs exhaustive ITM evaluation; ``checkpoint`` defaults to models/finetune.

    ``model`` (already built) bypasses the checkpoint, e.g. a random-init model in tests.
    """
    device = torch.device(device) if device is not None else pick_device()
    data = RetrievalSplit.from_prepared(prepared_dir, cfg.eval.split).subset(subset)
    if model is None:
        weights = Path(checkpoint) if checkpoint else Path("models/finetune/model.safetensors")
        model = load_model(cfg, weights, read_vocab_size(prepared_dir), device)
        source = str(weights)
    else:
        model = model.to(device)
        source = "in-memory model"
    model.eval()
    torch.manual_seed(cfg.seed)

    _sync(device)
    t0 = time.perf_counter()
    enc = encode_split(model, data, cfg.eval.batch_size, device)
    itc_i2t = itc_similarity(enc, cfg.eval.chunk_size)
    _sync(device)
    t_encode = time.perf_counter() - t0

    t0 = time.perf_counter()
    i2t, t2i = rerank(model, enc, itc_i2t, cfg.eval.k_test, cfg.eval.itm_batch_size, cfg.eval.chunk_size)
    _sync(device)
    t_rerank = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = exhaustive_itm(model, enc, cfg.eval.itm_batch_size)
    _sync(device)
    t_full = time.perf_counter() - t0

    base = {"txt2img": data.txt2img, "itc_i2t": itc_i2t, "itc_t2i": np.ascontiguousarray(itc_i2t.T)}
    reranked = metrics_from_scores({**base, "itm_i2t": i2t, "itm_t2i": t2i})
    exhaustive = metrics_from_scores({**base, "itm_i2t": full, "itm_t2i": np.ascontiguousarray(full.T)})
    recall_keys = [k for k in reranked if k.startswith("itm_") and "_r" in k and k[-1].isdigit()]
    max_diff = max(abs(reranked[k] - exhaustive[k]) for k in recall_keys)
    n_pairs_rerank = data.n_images * min(cfg.eval.k_test, data.n_texts) + data.n_texts * min(cfg.eval.k_test, data.n_images)
    return {
        "bench": "eval",
        "device": str(device),
        "checkpoint": source,
        "preset": cfg.model.preset,
        "split": cfg.eval.split,
        "images": data.n_images,
        "texts": data.n_texts,
        "k_test": cfg.eval.k_test,
        "encode_itc_s": round(t_encode, 4),
        "rerank_itm_s": round(t_rerank, 4),
        "exhaustive_itm_s": round(t_full, 4),
        "rerank_total_s": round(t_encode + t_rerank, 4),
        "exhaustive_total_s": round(t_encode + t_full, 4),
        "itm_pairs_rerank": n_pairs_rerank,
        "itm_pairs_exhaustive": data.n_images * data.n_texts,
        "rerank": {k: round(v, 3) for k, v in reranked.items() if k.startswith("itm_")},
        "exhaustive": {k: round(v, 3) for k, v in exhaustive.items() if k.startswith("itm_")},
        "itc": {k: round(v, 3) for k, v in reranked.items() if k.startswith("itc_")},
        "max_abs_recall_diff": round(float(max_diff), 4),
    }
