"""ITC: symmetric InfoNCE over [CLS] embeddings with image-id positives (METHOD.md 3.4).

A pair (image i, text j) of the batch is positive when image j is image i, or when text j
is token for token the caption drawn for image i: two images with the same caption (common
in the synthetic set, where 37% of training captions describe several images, and present
in real sets) would otherwise give one input two opposite labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_core.losses.distributed import gather_no_grad, gather_with_grad


def same_pair(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor,
              texts_rows: torch.Tensor | None = None, texts_cols: torch.Tensor | None = None) -> torch.Tensor:
    """[R, C] bool: row and column show the same image, or (when token ids [R, L] / [C, L]
    of the in-batch captions are given) carry the identical caption."""
    same = image_ids_rows[:, None] == image_ids_cols[None, :]
    if texts_rows is not None:
        same = same | (texts_rows[:, None, :] == texts_cols[None, :, :]).all(dim=-1)
    return same


def positive_targets(same: torch.Tensor) -> torch.Tensor:
    """[R, C] soft targets: uniform over the positive columns of each row (``same_pair``)."""
    same = same.float()
    return same / same.sum(dim=1, keepdim=True).clamp(min=1.0)


def itc_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor | float,
             texts: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised embeddings [B, E]. Positives: captions of the same
    image and, when the captions' token ids ``texts`` [B, L] are given, identical captions.

    Under DDP the embeddings and ids are gathered (with gradients) and the global-batch loss
    is returned on every rank. Computed in fp32."""
    img = gather_with_grad(img_emb).float()
    txt = gather_with_grad(txt_emb).float()
    ids = gather_no_grad(image_ids)
    all_texts = gather_no_grad(texts) if texts is not None else None
    logits = img @ txt.t() / torch.as_tensor(temp, dtype=torch.float32, device=img.device)
    targets = positive_targets(same_pair(ids, ids, all_texts, all_texts))  # a symmetric relation
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
