"""ITC: symmetric InfoNCE over [CLS] embeddings with image-id positives (METHOD.md 3.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_core.distributed import gather_no_grad, gather_with_grad


def positive_targets(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor) -> torch.Tensor:
    """[R, C] soft targets: uniform over the columns sharing the row's image id."""
    same = (image_ids_rows[:, None] == image_ids_cols[None, :]).float()
    return same / same.sum(dim=1, keepdim=True).clamp(min=1.0)


def itc_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, image_ids: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised embeddings [B, E]; captions of one image are all positives.

    Under DDP the embeddings and ids are gathered (with gradients) and the global-batch loss
    is returned on every rank. Computed in fp32."""
    img = gather_with_grad(img_emb).float()
    txt = gather_with_grad(txt_emb).float()
    ids = gather_no_grad(image_ids)
    logits = img @ txt.t() / torch.as_tensor(temp, dtype=torch.float32, device=img.device)
    targets = positive_targets(ids, ids)  # symmetric: same image id <=> positive
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2
