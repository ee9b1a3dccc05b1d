"""A learning test of the residual listwise re-ranker: it must fix what ITC cannot see.

A toy with a blind spot of ITC's by construction. Each 16 px image holds two colours, one
in its left half and one in its right half, and its caption names them in that order
("[CLS] red blue [SEP]"). The image side of ITC is the mean of the patch tokens of an image
tower with no transformer block and no final norm (each token: its patch's pixels
projected, plus its position embedding), a bag of patches: an image and its mirror ("blue red", whose gold
caption is the first one's swapped twin) get the same ITC embedding, so ITC cannot tell
them apart (R@1 at most half on such pairs). The fusion reads the same tokens, positions
included, with cross-attention from the caption. After a short ITC + ITM (listwise and binary) + MLM run, on
a test set of every ordered pair of distinct colours, the residual score (ITC / tau + ITM
margin) must beat ITC alone by a margin, on every seed; the blind spot is checked first.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dmp_core.evaluation.retrieval import (RetrievalSplit, encode_split, img2txt_from_txt2img, itc_similarity,
                                           rerank_candidates, retrieval_metrics, scorer_matrices)
from dmp_core.models import create_model, load_preset, mim_dim_for
from dmp_core.training.meta_arch import create_pretrainer
from dmp_core.training.schedule import build_optimizer, build_scheduler

COLOURS = np.array([[220, 40, 40], [40, 180, 60], [40, 70, 220], [240, 220, 50], [140, 55, 195], [245, 130, 195]],
                   dtype=np.uint8)
WORDS = [2417, 2665, 2630, 3756, 6379, 5061]  # red, green, blue, yellow, purple, pink (MiniLM vocabulary)
SIZE, VOCAB = 16, 30522
PAIRS = [(a, b) for a in range(len(COLOURS)) for b in range(len(COLOURS)) if a != b]  # 30 ordered pairs

# seeds of the test, and the floor on the R@1 gain (mean of TR and IR R@1, in points) of the
# residual re-ranker over ITC alone; bench/README.md ("Re-ranking: the binding toy") has the
# seeds the floor was set from
SEEDS = (0, 1, 2)
GAIN_FLOOR = 20.0
TOY_PARAMS = dict(objective__mim=False, objective__vicreg=False,
                  objective__itm_group_size=3, pretrain__lr=2e-3, pretrain__fusion_lr_scale=2.5,
                  model__text_pool="mean")


def binding_split(pairs: list[tuple[int, int]], seed: int) -> RetrievalSplit:
    rng = np.random.default_rng(seed)
    images = np.empty((len(pairs), SIZE, SIZE, 3), dtype=np.int64)
    for n, (left, right) in enumerate(pairs):
        images[n, :, : SIZE // 2] = COLOURS[left]
        images[n, :, SIZE // 2:] = COLOURS[right]
    images = np.clip(images + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    ids = np.array([[101, WORDS[left], WORDS[right], 102] for left, right in pairs], dtype=np.int64)
    return RetrievalSplit(images=images, input_ids=ids, attention_mask=np.ones_like(ids),
                          txt2img=np.arange(len(pairs)))


def micro_model(cfg):
    spec = copy.deepcopy(load_preset("tiny"))
    spec["image"]["patch_size"] = 8  # 2 x 2 patches: the left and the right half are different patches
    spec["image"]["overrides"].update(embed_dim=32, depth=0, num_heads=2)  # no block: tokens never mix
    spec["text"]["bert"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    spec["text"]["text_layers"] = 1
    spec["embed_dim"] = 16
    model = create_model(cfg.model, image_size=SIZE, vocab_size=VOCAB, spec=spec,
                         mim_dim=lambda width: mim_dim_for(cfg, width))
    # ITC's image side: the mean of the patch tokens, each a linear function of its patch plus its
    # position embedding (no block, no final norm): a bag of patches, blind to which half holds which colour
    model.vision.vit.norm = torch.nn.Identity()
    model.image_features = lambda states: model.image_proj(states[:, 1:].mean(dim=1))
    return model


def train_and_score(seed: int, steps: int = 1000, batch: int = 16) -> dict[str, float]:
    torch.manual_seed(seed)
    cfg = tiny_config(data__image_size=SIZE, pretrain__batch_size=batch, **TOY_PARAMS)
    pretrainer = create_pretrainer(cfg, "pretrain", micro_model(cfg)).train()
    optimizer = build_optimizer(pretrainer, cfg.pretrain)
    scheduler = build_scheduler(optimizer, cfg.pretrain, total_steps=steps)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        scheduler.step_update(step)
        # a batch of mirror pairs, each image beside its mirror (its ITC neighbour: the
        # training neighbourhood looks like the test's, as neighbour batches make it)
        anchors = [PAIRS[i] for i in rng.choice(len(PAIRS), batch // 2, replace=False)]
        pairs = [p for left, right in anchors for p in ((left, right), (right, left))]
        pairs = list(dict.fromkeys(pairs))  # an anchor drawn with its own mirror enters once
        train = binding_split(pairs, seed=seed * 100_003 + step)
        out = pretrainer({"image": torch.from_numpy(train.images.transpose(0, 3, 1, 2).copy()),
                          "image_id": torch.tensor([PAIRS.index(p) for p in pairs]),
                          "input_ids": torch.from_numpy(train.input_ids),
                          "attention_mask": torch.from_numpy(train.attention_mask)})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        pretrainer.model.clamp_temperature_()
    model = pretrainer.model.eval()
    test = binding_split(PAIRS, seed=seed + 200)
    enc = encode_split(model, test, batch_size=64, device="cpu")
    sim = itc_similarity(enc)
    cands = rerank_candidates(model, enc, sim, k_test=8, itm_batch_size=256)
    img2txt = img2txt_from_txt2img(test.txt2img, test.n_images)
    itc = retrieval_metrics(sim, sim.T, test.txt2img, img2txt)
    i2t, t2i = scorer_matrices(cands, sim, "rerank", tau=cfg.objective.rerank_tau)
    rerank = retrieval_metrics(i2t, t2i, test.txt2img, img2txt)
    r1 = lambda m: (m["tr_r1"] + m["ir_r1"]) / 2  # noqa: E731
    return {"itc_r1": r1(itc), "rerank_r1": r1(rerank), "gain_r1": r1(rerank) - r1(itc),
            "itc_r_mean": itc["r_mean"], "rerank_r_mean": rerank["r_mean"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_residual_listwise_reranker_fixes_what_itc_cannot_see(seed):
    seen = train_and_score(seed)
    assert seen["itc_r1"] <= 60.0, seen  # ITC's blind spot: at most half of each mirror pair, up to pixel noise
    assert seen["gain_r1"] >= GAIN_FLOOR and seen["rerank_r_mean"] >= seen["itc_r_mean"], seen
