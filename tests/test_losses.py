"""Each objective against a brute-force formula written with loops, and the objective
resolution (variant recipe + switches) with its one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from dmp_core.config import ParamsError
from dmp_core.losses import (itc_loss, itm_loss, mim_loss, mlm_loss, mrm_loss, mrm_targets, resolve_objectives,
                             sample_negatives, vicreg_loss)
from conftest import tiny_config


# --------------------------------------------------------------------------- VICReg
def _vicreg_reference(za, zb, sim_c=25.0, std_c=25.0, cov_c=1.0):
    n, d = len(za), len(za[0])
    sim = sum((za[i][j] - zb[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def stats(z):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[k][i] - means[i]) * (z[k][j] - means[j]) for k in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        var_term = sum(max(0.0, 1.0 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d
        cov_term = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return var_term, cov_term

    va, ca = stats(za)
    vb, cb = stats(zb)
    std, cov = (va + vb) / 2, ca + cb
    return sim, std, cov, sim_c * sim + std_c * std + cov_c * cov


def test_vicreg_matches_loops():
    g = torch.Generator().manual_seed(0)
    za = torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.7
    zb = za + 0.3 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    out = vicreg_loss(za, zb, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    ref = _vicreg_reference(za.tolist(), zb.tolist(), 2.0, 3.0, 0.5)
    for got, want in zip((out["sim"], out["std"], out["cov"], out["loss"]), ref):
        assert float(got) == pytest.approx(want, rel=1e-5)


def test_vicreg_known_covariance():
    """Samples with an analytic covariance: C = diag(s) A A^T diag(s)-like, large n."""
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 0.25]])
    chol = torch.linalg.cholesky(sigma)
    z = torch.randn(200_000, 3, generator=g) @ chol.T
    out = vicreg_loss(z, z)  # identical inputs: invariance 0, both modalities count
    off = sum(sigma[i, j] ** 2 for i in range(3) for j in range(3) if i != j) / 3
    var = sum(max(0.0, 1 - math.sqrt(sigma[j, j] + 1e-4)) for j in range(3)) / 3
    assert float(out["sim"]) == 0.0
    assert float(out["cov"]) == pytest.approx(2 * float(off), rel=0.03)
    assert float(out["std"]) == pytest.approx(var, abs=0.01)


def test_vicreg_is_fp32_under_half_inputs():
    z = torch.randn(16, 8).to(torch.bfloat16)
    out = vicreg_loss(z, z.flip(0))
    assert all(v.dtype == torch.float32 for v in out.values())


# ------------------------------------------------------------------------------ ITC
def _itc_reference(img, txt, ids, temp):
    n = len(ids)
    logits = [[sum(a * b for a, b in zip(img[i], txt[j])) / temp for j in range(n)] for i in range(n)]

    def direction(get):
        total = 0.0
        for i in range(n):
            row = [get(i, j) for j in range(n)]
            log_z = math.log(sum(math.exp(x) for x in row))
            positives = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(row[j] - log_z for j in positives) / len(positives)
        return total / n

    return (direction(lambda i, j: logits[i][j]) + direction(lambda i, j: logits[j][i])) / 2


def test_itc_with_duplicate_image_ids():
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = itc_loss(img, txt, ids, 0.1)
    want = _itc_reference(img.tolist(), txt.tolist(), ids.tolist(), 0.1)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # duplicates are positives, not negatives: this differs from the identity-target loss
    distinct = itc_loss(img, txt, torch.arange(7), 0.1)
    assert float(distinct) != pytest.approx(want, rel=1e-3)


def test_itc_identical_captions_of_different_images_are_positives():
    """Two images whose drawn captions are token-identical: the pair (image 0, text 1) is as
    true as (image 0, text 0), so it is a positive, like a caption of the same image."""
    g = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    texts = torch.tensor([[101, 7, 8, 102], [101, 7, 8, 102], [101, 9, 102, 0], [101, 5, 102, 0], [101, 9, 8, 102]])
    got = itc_loss(img, txt, torch.arange(5), 0.1, texts=texts)
    # the reference: images 0 and 1 as one "image id" for the positive sets
    want = _itc_reference(img.tolist(), txt.tolist(), [0, 0, 2, 3, 4], 0.1)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(itc_loss(img, txt, torch.arange(5), 0.1)) != pytest.approx(want, rel=1e-3)


# ------------------------------------------------------------------------------ ITM
def test_itm_negatives_never_share_the_image():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    for trial in range(50):
        sim = torch.randn(8, 8, generator=g) * 20  # peaked softmax, positives often dominate
        neg_t, neg_i = sample_negatives(sim, ids, generator=g)
        assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()
    neg_t, neg_i = sample_negatives(None, ids, generator=g)  # uniform
    assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()


def test_itm_negatives_never_carry_the_anchor_caption():
    """A text identical to the row's caption is not a negative for that row's image, and an
    image whose caption is identical to a text is not a negative for that text."""
    g = torch.Generator().manual_seed(5)
    ids = torch.arange(6)
    texts = torch.tensor([[101, 7, 102], [101, 7, 102], [101, 8, 102], [101, 9, 102], [101, 7, 102], [101, 8, 102]])
    same_text = (texts[:, None] == texts[None]).all(-1)
    for _ in range(50):
        sim = torch.randn(6, 6, generator=g) * 20
        sim[same_text] = 50.0  # identical captions are what ITC ranks first
        neg_t, neg_i = sample_negatives(sim, ids, texts=texts, generator=g)
        assert not same_text[ids, neg_t].any() and not same_text[ids, neg_i].any()
    neg_t, _ = sample_negatives(sim, ids, generator=g)  # without texts: only the image id counts
    assert same_text[ids, neg_t].any()


def test_itm_rows_with_vanishing_or_no_allowed_entries():
    ids = torch.tensor([0, 0, 1])
    sim = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, -1e4], [-1e4, -1e4, 0.0]])  # allowed weights underflow
    neg_t, neg_i = sample_negatives(sim, ids, generator=torch.Generator().manual_seed(0))
    assert neg_t[:2].tolist() == [2, 2] and neg_t[2].item() in (0, 1)  # uniform over the allowed entries
    assert neg_i[:2].tolist() == [2, 2] and neg_i[2].item() in (0, 1)
    same = torch.zeros(4, dtype=torch.long)  # one image in the whole batch: no negative at all
    neg_t, neg_i = sample_negatives(torch.randn(4, 4), same)
    assert neg_t.tolist() == [-1] * 4 and neg_i.tolist() == [-1] * 4


def test_itm_loss_is_cross_entropy():
    logits = torch.tensor([[0.2, 1.0], [2.0, -1.0]])
    labels = torch.tensor([1, 0])
    rows, targets = logits.tolist(), labels.tolist()
    want = sum(-math.log(math.exp(r[y]) / sum(math.exp(x) for x in r)) for r, y in zip(rows, targets)) / 2
    assert float(itm_loss(logits, labels)) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------- MIM / MLM / MRM
def test_mim_only_masked_patches_count():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    for kind in ("hog", "pixel", "momentum"):
        base = mim_loss(pred, target, mask, kind)
        perturbed = target.clone()
        perturbed[~mask] += 100.0
        assert torch.equal(mim_loss(pred, perturbed, mask, kind), base)
        changed = target.clone()
        changed[mask] += 1.0
        assert not torch.equal(mim_loss(pred, changed, mask, kind), base)
    rows = [(b, p) for b in range(2) for p in range(6) if mask[b, p]]
    mse = sum(float((pred[b, p, k] - target[b, p, k]) ** 2) for b, p in rows for k in range(5)) / (len(rows) * 5)
    l1 = sum(abs(float(pred[b, p, k] - target[b, p, k])) for b, p in rows for k in range(5)) / (len(rows) * 5)
    assert float(mim_loss(pred, target, mask, "hog")) == pytest.approx(mse, rel=1e-5)
    assert float(mim_loss(pred, target, mask, "pixel")) == pytest.approx(l1, rel=1e-5)
    total = 0.0
    for b, p in rows:
        pn, tn = pred[b, p].norm(), target[b, p].norm()
        total += sum(abs(float(pred[b, p, k] / pn - target[b, p, k] / tn)) for k in range(5))
    assert float(mim_loss(pred, target, mask, "momentum")) == pytest.approx(total / (len(rows) * 5), rel=1e-5)


def test_mlm_ignores_unlabelled_and_handles_no_mask():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, -100], [5, -100, -100, 1]])
    want = 0.0
    picked = [(0, 1), (1, 0), (1, 3)]
    for b, p in picked:
        row = logits[b, p].detach()
        want += -(row[labels[b, p]] - row.exp().sum().log())
    assert mlm_loss(logits, labels).item() == pytest.approx(float(want) / 3, rel=1e-5)
    none = mlm_loss(logits, torch.full((2, 4), -100))
    none.backward()
    assert none.item() == 0.0


def test_mrm_targets_are_normalised_detached_and_masked():
    ema = torch.randn(3, 5, 8) * 4 + 2
    tgt = mrm_targets(ema)
    assert not tgt.requires_grad
    for b in range(3):
        for p in range(5):
            row = ema[b, p].tolist()
            mean = sum(row) / 8
            var = sum((x - mean) ** 2 for x in row) / 8
            for k in range(8):
                assert float(tgt[b, p, k]) == pytest.approx((row[k] - mean) / math.sqrt(var + 1e-5), abs=1e-4)
    pred = torch.randn(3, 5, 8, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = True
    out = mrm_loss(pred, tgt, mask)
    moved = tgt.clone()
    moved[~mask] = 7.0
    assert torch.equal(mrm_loss(pred, moved, mask)["loss"], out["loss"])
    want = sum(float((pred[b, p, k].detach() - tgt[b, p, k]) ** 2) for b, p in [(0, 1), (2, 4)] for k in range(8)) / 16
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-5)
    out["loss"].backward()
    assert pred.grad[~mask].abs().sum() == 0
    # the collapse diagnostic: std per dim over the masked positions, mean over dims
    sel = tgt[mask]
    assert float(out["target_std"]) == pytest.approx(float(sel.std(dim=0).mean()), rel=1e-6)


# ------------------------------------------------------------------------ resolution
@pytest.mark.parametrize("overrides,message", [
    ({"objective__variant": "denoising", "objective__mrm": True}, "mrm needs the EMA"),
    ({"objective__variant": "denoising", "objective__mim_target": "momentum"}, "momentum needs the EMA"),
    ({"objective__itc": False, "objective__vicreg": False}, "no negative source"),
    ({"objective__itc": False, "objective__itm_negatives": "itc"}, "no negative source"),
    ({"objective__mim": False, "objective__mlm": False, "objective__itc": False, "objective__itm": False,
      "objective__vicreg": False, "objective__variant": "denoising"}, "every objective is switched off"),
])
def test_impossible_combinations_fail_at_load(overrides, message):
    with pytest.raises(ParamsError, match=message) as info:
        tiny_config(**overrides)
    assert "\n" not in str(info.value) and "objective" in str(info.value)


def test_recipes():
    den = resolve_objectives(tiny_config().objective)
    assert den.active == ["itc", "itm", "mlm", "mim", "vicreg"] and den.mim_target == "hog"
    assert den.text_mask_ratio == 0.40 and not den.needs_ema
    mamo = resolve_objectives(tiny_config(objective__variant="mamo").objective)
    assert mamo.active == ["itc", "itm", "mlm", "mim", "mrm"] and mamo.mim_target == "momentum"
    assert mamo.text_mask_ratio == 0.25 and mamo.needs_ema
    no_itc = resolve_objectives(tiny_config(objective__itc=False).objective)
    assert no_itc.itm_negatives == "vicreg"
    bare = resolve_objectives(tiny_config(objective__vicreg=False).objective)  # the `-S objective.vicreg=false` switch
    assert not bare.vicreg


# ---------------------------------------------------------------------------- DDP
def _ddp_data():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])  # duplicates across the rank boundary too
    return a, b, ids, torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)


def _ddp_losses(a, b, ids, za, zb):
    leaves = [t.clone().requires_grad_() for t in (a, b, za, zb)]
    loss = itc_loss(leaves[0], leaves[1], ids, 0.1) + vicreg_loss(leaves[2], leaves[3])["loss"]
    loss.backward()
    return float(loss.detach()), [t.grad for t in leaves]


def _ddp_worker(rank, world, port, reference, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    a, b, ids, za, zb = _ddp_data()
    rows = slice(rank * 4, rank * 4 + 4)
    loss, grads = _ddp_losses(a[rows], b[rows], ids[rows], za[rows], zb[rows])
    # every rank computes the global loss; its local gradient is world * dL/dx (DDP averages)
    same_grads = all(torch.allclose(g / world, ref[rows], atol=1e-6) for g, ref in zip(grads, reference[1]))
    results[rank] = (loss, same_grads)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_itc_and_vicreg_at_world_size_2_equal_the_concatenated_batch():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reference = _ddp_losses(*_ddp_data())
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, reference, results), nprocs=2)
    for rank in range(2):
        loss, same_grads = results[rank]
        assert loss == pytest.approx(reference[0], rel=1e-6) and same_grads


# ------------------------------------------------------------------ listwise ITM (rerank.py)
def test_neighbour_groups_are_the_nearest_allowed_candidates_in_order():
    from dmp_core.losses.rerank import neighbour_groups

    image_ids = torch.tensor([0, 0, 1, 2, 3])
    texts = torch.tensor([[5, 6], [7, 8], [9, 9], [5, 6], [1, 2]])  # row 3 repeats row 0's caption
    sim = torch.tensor([[9.0, 8.0, 1.0, 7.0, 2.0],
                        [8.0, 9.0, 3.0, 1.0, 2.0],
                        [1.0, 2.0, 9.0, 3.0, 4.0],
                        [7.0, 0.0, 5.0, 9.0, 6.0],
                        [0.0, 1.0, 2.0, 3.0, 9.0]])
    index, valid = neighbour_groups(sim, image_ids, 2, texts=texts)
    # row 0: never its own image (cols 0, 1) nor the identical caption (col 3): cols 4, 2 by similarity
    assert index[0].tolist() == [4, 2] and valid[0].all()
    assert index[1].tolist() == [2, 4] and index[2].tolist() == [4, 3] and index[3].tolist() == [4, 2]
    # a loop over rows as the reference of the rule, with k larger than what is allowed
    index, valid = neighbour_groups(sim, image_ids, 4, texts=texts)
    for r in range(5):
        allowed = [c for c in range(5) if image_ids[c] != image_ids[r] and not torch.equal(texts[c], texts[r])]
        want = sorted(allowed, key=lambda c: -float(sim[r, c]))
        assert index[r][valid[r]].tolist() == want and int(valid[r].sum()) == len(want)


def test_neighbour_groups_uniform_draws_stay_allowed():
    from dmp_core.losses.rerank import neighbour_groups

    image_ids = torch.arange(8).repeat_interleave(2)
    g = torch.Generator().manual_seed(0)
    index, valid = neighbour_groups(None, image_ids, 3, generator=g)
    assert valid.all() and (image_ids[index] != image_ids[:, None]).all()
    assert len({tuple(row) for row in index.tolist()}) > 1


def test_listwise_loss_is_cross_entropy_over_the_valid_group():
    from dmp_core.losses.rerank import listwise_loss, residual_scores

    sim = torch.tensor([[0.5, 0.4, 0.45], [0.2, 0.9, 0.0]])
    margin = torch.tensor([[1.0, 0.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    z = residual_scores(sim, margin, tau=0.1)
    out = listwise_loss(z, valid)
    row0 = -torch.log_softmax(torch.tensor([5.0 + 1.0, 4.0, 4.5 + 0.5]), 0)[0]
    row1 = -torch.log_softmax(torch.tensor([2.0, 9.0 - 1.0]), 0)[0]  # the invalid column never counts
    assert float(out["loss"].detach()) == pytest.approx(float((row0 + row1) / 2), rel=1e-6)
    assert float(out["acc"]) == 0.5
    out["loss"].backward()
    assert margin.grad[1, 2] == 0  # no gradient to an invalid candidate
    # soft targets: a distribution over the group instead of the one-hot positive
    soft = torch.tensor([[0.6, 0.2, 0.2], [1.0, 0.0, 0.0]])
    got = listwise_loss(z.detach(), valid, soft)["loss"]
    logp0 = torch.log_softmax(torch.tensor([6.0, 4.0, 5.0]), 0)
    want = (-(soft[0] * logp0).sum() + row1) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_residual_score_leaves_itc_alone_at_a_zero_margin_and_stops_its_gradient():
    from dmp_core.losses.rerank import residual_scores

    sim = torch.tensor([0.3, -0.2], requires_grad=True)
    z = residual_scores(sim, torch.zeros(2), tau=0.05, itc_weight=2.0)
    assert torch.allclose(z, torch.tensor([12.0, -8.0]))
    assert not z.requires_grad  # stop_grad(sim): the re-ranker never moves the retriever
