"""MLM: cross-entropy at the masked token positions of the fused (clean image, masked text) state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_core.losses.masking import IGNORE_INDEX


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., V] at the positions of ``labels`` [...] (-100 = not predicted).

    Mean over the predicted positions; 0 (with a graph) when nothing is masked."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
