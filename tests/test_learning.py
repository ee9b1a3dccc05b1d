"""A short learning test: the fused model must come to use the image.

A toy image-caption task on a micro model: each image is one colour (of eight, with
pixel noise) and its caption names the colour, so a caption can be matched, or its
masked colour word predicted, only by looking at the image. After a short denoising
pretraining run, on a test set of one image per colour, the per-query ITM AUC (each image
query's gold caption against the seven others, each caption query's gold image against
the seven others) and the image-use gap (MLM loss with shuffled minus matching images)
must be far above their no-information values, for every one of several seeds. The
control run sees blank images, where both are exactly at those values (0.5: identical
images tie every caption query, and the image queries' AUCs average the ranks of every
caption once; 0: shuffling identical images changes nothing), so the test fails if the
fusion ignores the image.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dmp_core.evaluation.diagnostics import image_use_gap, itm_auc
from dmp_core.evaluation.retrieval import RetrievalSplit, encode_split, itc_similarity
from dmp_core.models import create_model, load_preset, mim_dim_for
from dmp_core.losses.masking import SpecialTokens
from dmp_core.training.meta_arch import create_pretrainer
from dmp_core.training.schedule import build_optimizer, build_scheduler

COLOURS = np.array([[220, 40, 40], [40, 180, 60], [40, 70, 220], [240, 220, 50], [245, 140, 25], [140, 55, 195],
                    [245, 130, 195], [120, 80, 40]], dtype=np.uint8)
# red, green, blue, yellow, orange, purple, pink, brown in the MiniLM vocabulary
WORDS = [2417, 2665, 2630, 3756, 4589, 6379, 5061, 2829]
SIZE, VOCAB = 16, 30522


def toy_split(n: int, seed: int, blank: bool = False) -> RetrievalSplit:
    """``n`` noisy one-colour images with their captions; ``n=0``: one image per colour."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, len(COLOURS), n) if n else np.arange(len(COLOURS))
    n = len(colour)
    images = np.repeat(COLOURS[colour][:, None, None, :], SIZE, 1).repeat(SIZE, 2)
    images = np.clip(images + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    if blank:
        images[:] = 128
    # "[CLS] a <colour> square [SEP]"
    ids = np.array([[101, 1037, WORDS[c], 2675, 102] for c in colour], dtype=np.int64)
    return RetrievalSplit(images=images, input_ids=ids, attention_mask=np.ones_like(ids), txt2img=np.arange(n))


def micro_model(cfg):
    spec = copy.deepcopy(load_preset("tiny"))
    spec["image"]["patch_size"] = 8  # 2 x 2 patches of the 16 px images
    spec["image"]["overrides"].update(embed_dim=32, depth=1, num_heads=2)
    spec["text"]["bert"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    spec["text"]["text_layers"] = 1
    spec["embed_dim"] = 16
    return create_model(cfg.model, image_size=SIZE, vocab_size=VOCAB, spec=spec,
                        mim_dim=lambda width: mim_dim_for(cfg, width))


# the ITM settings are the defaults' (pair state, negatives); the rest is pinned for the toy. The run
# uses the training loop's schedule (warm-up, then cosine): at a constant learning rate the last
# steps' updates leave some seeds' ITM head oscillating (AUC 0.70-0.85 for 1-2 seeds in 10,
# which seeds depending on the CPU's kernels; bench/README.md, "Toy learning test")
# the seed's binary ITM (objective.itm_loss=binary): the test and its 10-seed floors are about the
# fusion coming to use the image; tests/test_rerank_learning.py covers the listwise re-ranker
TOY_PARAMS = dict(pretrain__lr=2e-3, pretrain__fusion_lr_scale=2.5, objective__w_vicreg=0.04, objective__itm_loss="binary",
                  model__text_pool="cls", objective__vicreg_coeffs__expander_dim=None)
# seeds of the test; bench/README.md ("Toy learning test") has the 10-seed table its floors come from
SEEDS = (0, 1, 2)
AUC_FLOOR, GAP_FLOOR = 0.8, 0.3


def train_and_measure(blank: bool, steps: int = 300, batch: int = 16, seed: int = 0, schedule: bool = True,
                      **overrides) -> dict[str, float]:
    torch.manual_seed(seed)
    # every setting the outcome depends on is pinned here, not taken from the (CPU-budget) defaults
    cfg = tiny_config(data__image_size=SIZE, pretrain__batch_size=batch, **{**TOY_PARAMS, **overrides})
    pretrainer = create_pretrainer(cfg, "pretrain", micro_model(cfg)).train()
    optimizer = build_optimizer(pretrainer, cfg.pretrain)
    scheduler = build_scheduler(optimizer, cfg.pretrain, total_steps=steps) if schedule else None
    train = toy_split(512, seed=1, blank=blank)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        pretrainer.progress = step / steps
        if scheduler is not None:
            scheduler.step_update(step)
        rows = rng.choice(train.n_images, batch, replace=False)
        images = torch.from_numpy(train.images[rows].transpose(0, 3, 1, 2).copy())
        out = pretrainer({"image": images, "image_id": torch.from_numpy(rows),
                          "input_ids": torch.from_numpy(train.input_ids[rows]),
                          "attention_mask": torch.from_numpy(train.attention_mask[rows])})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        pretrainer.model.clamp_temperature_()
    model = pretrainer.model.eval()
    test = toy_split(0, seed=2, blank=blank)
    enc = encode_split(model, test, batch_size=64, device="cpu")
    auc = itm_auc(model, enc, itc_similarity(enc), test.txt2img, k=len(COLOURS),
                  n_queries=len(COLOURS))["itm_auc"]
    gap = image_use_gap(model, test, n_pairs=len(COLOURS), mask_ratio=0.4, special=SpecialTokens())["image_use_gap"]
    return {"itm_auc": auc, "image_use_gap": gap}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_fusion_learns_to_use_the_image(seed):
    seen = train_and_measure(blank=False, seed=seed)
    assert seen["itm_auc"] >= AUC_FLOOR and seen["image_use_gap"] >= GAP_FLOOR, seen


@pytest.mark.slow
def test_blank_images_leave_both_measures_at_their_no_information_values():
    """The control: without image content neither measure can leave its no-information value."""
    blind = train_and_measure(blank=True, steps=30)  # blank images: exact values whatever the steps
    assert blind["itm_auc"] == pytest.approx(0.5, abs=1e-9) and blind["image_use_gap"] == 0.0, blind
