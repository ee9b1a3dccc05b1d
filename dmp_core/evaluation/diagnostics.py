"""Diagnostics that say whether the fused model uses both modalities.

A retrieval number is only as good as the component behind it: an ITM head at its class
prior makes re-ranked recall noise, and a fusion that ignores the image makes "MLM
conditioned on the image" plain language modelling. Three measurements, each on the
evaluated split, each a difference the model can only produce by using a modality:

* **ITM AUC** (:func:`itm_auc`): ROC-AUC of the ITM match logit, gold pairs against the
  ITC top-k non-gold candidates of the same queries, i.e. exactly the pairs re-ranking
  must order. 0.5 = the head cannot tell them apart.
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


@torch.inference_mode()
def itm_auc(model: torch.nn.Module, enc: EncodedSplit, sim_i2t: np.ndarray, txt2img: np.ndarray, *, k: int,
            n_queries: int, itm_batch_size: int = 256, input_ids: Optional[np.ndarray] = None) -> dict[str, float]:
    """ROC-AUC of ITM logits: every gold caption of a query image (label 1) against its
    ITC top-``k`` non-gold captions (label 0), pooled over ``n_queries`` images.

    With the split's token ids ``input_ids`` [T, L], a non-gold caption whose tokens equal
    one of the query's gold captions is left out: it is the same input as a gold pair
    (the synthetic set repeats captions across images), so no model can score it lower.
    ``n_auc_identical`` counts them."""
    from sklearn.metrics import roc_auc_score

    txt2img = np.asarray(txt2img)
    images, texts, labels = [], [], []
    identical = 0
    for i in _query_images(sim_i2t.shape[0], n_queries):
        gold = np.flatnonzero(txt2img == i)
        order = np.argsort(-sim_i2t[i], kind="stable")
        candidates = order[txt2img[order] != i]
        if input_ids is None:
            negatives = candidates[:k]
        else:  # walk down the ITC ranking, skipping captions identical to a gold one
            gold_rows = {tuple(np.asarray(input_ids[g]).tolist()) for g in gold}
            negatives = []
            for t in candidates:
                if len(negatives) == k:
                    break
                if tuple(np.asarray(input_ids[t]).tolist()) in gold_rows:
                    identical += 1
                else:
                    negatives.append(t)
        for t, label in [(g, 1) for g in gold] + [(n, 0) for n in negatives]:
            images.append(i)
            texts.append(int(t))
            labels.append(label)
    scores = itm_scores(model, enc, torch.tensor(images), torch.tensor(texts), itm_batch_size).numpy()
    labels_arr = np.asarray(labels)
    auc = float(roc_auc_score(labels_arr, scores)) if 0 < labels_arr.sum() < len(labels_arr) else float("nan")
    return {"itm_auc": auc, "n_auc_queries": int(len(set(images))), "n_auc_pairs": int(len(labels)),
            "n_auc_identical": identical}


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
    from dmp_core.training.masking import IGNORE_INDEX, mask_text

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
    from dmp_core.training.masking import image_block_mask
    from dmp_core.training.meta_arch import mim_targets

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
        patch_mask = image_block_mask(len(img), model.grid_size, mask_ratio, generator=gen, device=device)
        masked_states = model.encode_image(pixels, patch_mask)
        if kind == "momentum":
            target = model.encode_image(pixels)[:, 1:]
        else:
            target = mim_targets(cfg, kind, img, model)
        for name, (t_ids, t_attn) in (("matched", (ids, attn)), ("shuffled", (other_ids, other_attn))):
            joint = model.fuse(masked_states, model.encode_text(t_ids, t_attn), t_attn)
            loss = mim_loss(model.mim_predictions(joint), target, patch_mask, kind)
            sums[name] += float(loss) * len(img)
        count += len(img)
    matched, shuffled_loss = sums["matched"] / count, sums["shuffled"] / count
    return {"text_use_gap": shuffled_loss - matched, "mim_loss_matched": matched, "mim_loss_shuffled": shuffled_loss}


def modality_gaps(model: torch.nn.Module, data: RetrievalSplit, cfg: Any, special: Any) -> dict[str, Any]:
    """Image-use and text-use gaps with the run's own mask ratios (eval.diag_pairs pairs)."""
    objectives = cfg.objective.resolve()
    n_pairs = cfg.eval.diag_pairs
    # the finetuned model is measured with the pretraining mask ratios of its variant
    text_ratio = objectives.text_mask_ratio
    out: dict[str, Any] = image_use_gap(model, data, n_pairs=n_pairs, mask_ratio=text_ratio, special=special,
                                        seed=cfg.seed)
    out.update(text_use_gap(model, data, cfg, n_pairs=n_pairs, mask_ratio=objectives.image_mask_ratio,
                            seed=cfg.seed))
    return out
