"""The fusion diagnostics on hand-built models whose answers are known exactly.

The split: image i is a flat grey image whose value encodes i; its captions repeat the
token 1000 + i. ``Oracle`` fuses image and text so that ITM compares the two ids, MLM
predicts 1000 + (image id) with logit ``c`` and MIM predicts the target direction only
when the caption matches. ``Blind`` never lets the image (or the text) into the fused
states. Hence: ITM AUC 1.0 vs 0.5; image-use gap exactly ``c`` vs 0; text-use gap 0.5 vs 0.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config
from dmp_core.evaluation.diagnostics import image_use_gap, itm_auc, text_use_gap
from dmp_core.evaluation.retrieval import RetrievalSplit, encode_split
from dmp_core.models.fusion import JointLayout
from dmp_core.losses.masking import SpecialTokens

VOCAB, SIZE, PATCH, LOGIT = 1200, 16, 8, 3.0
N_IMAGES, CAPTIONS, LENGTH = 12, 2, 6


def make_split() -> RetrievalSplit:
    images = np.zeros((N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    ids, txt2img = [], []
    for i in range(N_IMAGES):
        images[i] = 10 * (i + 1)  # ids start at 1: a zero vector has no direction
        for _ in range(CAPTIONS):
            ids.append([101] + [1000 + i + 1] * (LENGTH - 2) + [102])
            txt2img.append(i)
    ids = np.asarray(ids, dtype=np.int64)
    return RetrievalSplit(images=images, input_ids=ids, attention_mask=np.ones_like(ids), txt2img=np.asarray(txt2img))


class HandBuilt(nn.Module):
    """The model API the diagnostics use, with every answer fixed by construction."""

    def __init__(self, oracle: bool) -> None:
        super().__init__()
        self.oracle = oracle
        self.anchor = nn.Parameter(torch.zeros(1))  # device / dtype for the evaluation helpers
        self.vocab_size = VOCAB
        self.grid_size = (SIZE // PATCH, SIZE // PATCH)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_block = 2  # SimMIM blocks of 2 x 2 patches, as the ViT tower
        self.layout = JointLayout(fusion_cls=False, image_cls=True, num_patches=self.num_patches)
        self.mim_head = nn.Identity()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        image_id = images[:, 0, 0, 0] / 10.0  # [B]
        states = torch.zeros(images.shape[0], 1 + self.num_patches, 4)
        states[:, :, 0] = image_id[:, None]
        if patch_mask is not None:  # a masked patch shows nothing
            states[:, 1:, 0] = states[:, 1:, 0] * (~patch_mask.bool())
        return states

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = torch.zeros(*input_ids.shape, 4)
        states[..., 0] = input_ids.float()
        # the caption's id, readable even where its tokens are masked: the last real token before [SEP]
        states[..., 3] = (input_ids.max(dim=1).values.float() - 1000.0)[:, None]
        return states

    def fuse(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = text_states.clone()
        image_id = image_states[:, 0, 0]
        if self.oracle:
            text[..., 1] = image_id[:, None]  # the image's id reaches every token state
        patches = image_states[:, 1:].clone()
        if self.oracle:  # masked patches predict the image direction when the caption matches
            match = (text_states[:, 0, 3] == image_id).float()[:, None]
            masked = patches[..., 0] == 0
            patches[..., 0] = torch.where(masked, match, patches[..., 0])
            patches[..., 1] = torch.where(masked, 1 - match, patches[..., 1])
        return torch.cat([image_states[:, :1], patches, text], dim=1)

    def image_embed(self, states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(states[:, 0] + 1.0, dim=-1)

    def text_embed(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(states[:, 0] + 1.0, dim=-1)

    def itm_logits(self, joint: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.layout.tokens(joint)
        if self.oracle:
            match = (tokens[:, 0, 3] == joint[:, 0, 0]).float() * 2 - 1
        else:
            match = torch.zeros(joint.shape[0])
        return torch.stack([-match, match], dim=1)

    def pair_scores(self, joint: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.itm_logits(joint, attention_mask)  # (ITM margin, the re-ranking head's correction: none)
        return logits[:, 1] - logits[:, 0], torch.zeros(joint.shape[0])

    def mlm_logits(self, token_states: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(token_states.shape[0], VOCAB)
        if self.oracle:
            guess = (1000 + token_states[:, 1]).long()
            logits[torch.arange(len(guess)), guess] = LOGIT
        return logits

    def mim_predictions(self, joint: torch.Tensor) -> torch.Tensor:
        return self.layout.patches(joint)


@pytest.fixture(scope="module")
def split() -> RetrievalSplit:
    return make_split()


def _auc(model: HandBuilt, split: RetrievalSplit) -> float:
    enc = encode_split(model, split, batch_size=5, device="cpu")
    sim = np.random.default_rng(0).normal(size=(split.n_images, split.n_texts)).astype(np.float32)
    return itm_auc(model, enc, sim, split.txt2img, k=4, n_queries=split.n_images, itm_batch_size=7)["itm_auc"]


def test_itm_auc_is_one_for_the_oracle_and_one_half_for_a_blind_head(split):
    assert _auc(HandBuilt(oracle=True), split) == 1.0
    assert _auc(HandBuilt(oracle=False), split) == 0.5


def test_itm_auc_leaves_out_candidates_identical_to_a_gold_caption(split):
    """Images 0 and 1 carry token-identical captions: for query 0, image 1's captions are
    the same input as its gold pairs. ITC ranks them first; the AUC skips (and counts) them."""
    ids = np.array(split.input_ids)
    ids[split.txt2img == 1] = ids[split.txt2img == 0][0]
    dup = RetrievalSplit(images=split.images, input_ids=ids, attention_mask=split.attention_mask, txt2img=split.txt2img)
    model = HandBuilt(oracle=True)
    enc = encode_split(model, dup, batch_size=5, device="cpu")
    sim = np.random.default_rng(0).normal(size=(dup.n_images, dup.n_texts)).astype(np.float32)
    sim[0, dup.txt2img == 0] = 9.0  # gold in the top-k of query 0 ...
    sim[0, dup.txt2img == 1] = 10.0  # ... below the identical captions of image 1
    kwargs = dict(k=2 * CAPTIONS + 2, n_queries=1, itm_batch_size=7)
    plain = itm_auc(model, enc, sim, dup.txt2img, **kwargs)
    skipping = itm_auc(model, enc, sim, dup.txt2img, input_ids=dup.input_ids, **kwargs)
    assert plain["n_auc_identical"] == 0 and skipping["n_auc_identical"] >= CAPTIONS
    assert plain["itm_auc_i2t"] == 0.75  # the oracle scores the identical captions as matches: ties
    assert skipping["itm_auc_i2t"] == 1.0


def test_itm_auc_is_per_query(split):
    """A head whose logits carry a per-query offset (here: the image id) still orders each
    query's candidates perfectly: per-query AUC 1, where a pooled ROC would mix the offsets."""
    model = HandBuilt(oracle=True)
    base = model.itm_logits
    model.itm_logits = lambda joint, mask: base(joint, mask) + 10.0 * joint[:, :1, 0]  # image id offset
    enc = encode_split(model, split, batch_size=5, device="cpu")
    sim = np.random.default_rng(1).normal(size=(split.n_images, split.n_texts)).astype(np.float32)
    out = itm_auc(model, enc, sim, split.txt2img, k=6, n_queries=split.n_images, itm_batch_size=7)
    assert out["itm_auc_i2t"] == 1.0 and out["itm_auc_random"] == 1.0
    assert out["itm_auc_lo"] <= out["itm_auc"] <= out["itm_auc_hi"]


def test_image_use_gap_equals_the_known_logit(split):
    special = SpecialTokens()
    oracle = image_use_gap(HandBuilt(oracle=True), split, n_pairs=N_IMAGES, mask_ratio=0.4, special=special)
    # matched: the label gets logit c, shuffled: another token does; gap = c exactly
    assert oracle["mlm_loss_matched"] == pytest.approx(math.log(1 + (VOCAB - 1) * math.exp(-LOGIT)), rel=1e-5)
    assert oracle["mlm_loss_shuffled"] == pytest.approx(math.log(math.exp(LOGIT) + VOCAB - 1), rel=1e-5)
    assert oracle["image_use_gap"] == pytest.approx(LOGIT, rel=1e-5)
    blind = image_use_gap(HandBuilt(oracle=False), split, n_pairs=N_IMAGES, mask_ratio=0.4, special=special)
    assert blind["image_use_gap"] == 0.0 and blind["mlm_loss_matched"] == pytest.approx(math.log(VOCAB))


def test_text_use_gap_on_momentum_targets(split):
    """L1 between L2-normalised vectors: matched predictions point at the target (loss 0),
    shuffled ones are orthogonal to it (mean |e1 - e0| over 4 dims = 0.5)."""
    cfg = tiny_config(objective__variant="mamo")  # MIM target: momentum (the image tower's own features)
    oracle = text_use_gap(HandBuilt(oracle=True), split, cfg, n_pairs=N_IMAGES, mask_ratio=0.75)
    assert oracle["mim_loss_matched"] == pytest.approx(0.0, abs=1e-6)
    assert oracle["mim_loss_shuffled"] == pytest.approx(0.5, abs=1e-6)
    assert oracle["text_use_gap"] == pytest.approx(0.5, abs=1e-6)
    blind = text_use_gap(HandBuilt(oracle=False), split, cfg, n_pairs=N_IMAGES, mask_ratio=0.75)
    assert blind["text_use_gap"] == 0.0


def test_no_mim_head_gives_no_text_use_gap(split):
    model = HandBuilt(oracle=True)
    model.mim_head = None
    assert text_use_gap(model, split, tiny_config(), n_pairs=4, mask_ratio=0.75)["text_use_gap"] is None
