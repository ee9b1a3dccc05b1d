"""Retrieval numbers *reported* in the seed paper ("Denoising Multimodal Pretraining for
Retrieval", A. K. Jha et al.; summarised in docs/METHOD.md).

They come from other data, other models and other compute than ours; the report
prints them in their own, clearly labelled rows, never as a comparison of equals.
Every value is R@K in percent.
"""
from __future__ import annotations

SEED_RESULTS: list[dict] = [
    {
        "method": "MAMO (seed reimplementation, reported)",
        "source": "seed paper, Table 1",
        "dataset": "flickr30k",
        "pretraining": "Flickr30K only, ViT-S/16 + BERT-small, 15 epochs",
        "protocol": "ALBEF re-ranking, k=128",
        "tr_r1": 67.8, "tr_r5": 88.1, "tr_r10": 94.3,
        "ir_r1": 55.56, "ir_r5": 79.14, "ir_r10": 84.94,
    },
    {
        "method": "MAMO (original paper, reported)",
        "source": "seed paper, Figure 2 (from MAMO, SIGIR 2023)",
        "dataset": "flickr30k",
        "pretraining": "4M images, ViT-B + BERT-base",
        "protocol": "ALBEF re-ranking, 1k test set",
        "tr_r1": 96.2, "tr_r5": 99.5, "tr_r10": 99.8,
        "ir_r1": 86.1, "ir_r5": 97.0, "ir_r10": 98.4,
    },
    {
        "method": "MAMO (original paper, reported)",
        "source": "seed paper, Figure 2 (from MAMO, SIGIR 2023)",
        "dataset": "coco",
        "pretraining": "4M images, ViT-B + BERT-base",
        "protocol": "ALBEF re-ranking, 5k test set",
        "tr_r1": 79.1, "tr_r5": 94.9, "tr_r10": 97.8,
        "ir_r1": 62.4, "ir_r5": 85.3, "ir_r10": 91.3,
    },
]
