"""The Pretrainer: objective assembly per variant and switches, gradient routing (EMA
untouched, masked positions only), no redundant passes, determinism, and an overfit run."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from dmp_core.config import ParamsError
from dmp_core.training.meta_arch import create_pretrainer
from dmp_core.models import create_model, load_preset, mim_dim_for
from dmp_core.targets import hog

VOCAB = 1000


@pytest.fixture(autouse=True)
def one_thread():
    """Micro-sized ops run much faster on one thread than on two threads waiting on each
    other (measured 1 s vs 33 s for the overfit test on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_spec(width: int = 32) -> dict:
    spec = copy.deepcopy(load_preset("tiny"))
    spec["image"]["overrides"].update(embed_dim=width, depth=1, num_heads=2)
    spec["text"]["bert"].update(hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=2 * width)
    spec["text"]["text_layers"] = 1
    spec["embed_dim"] = 16
    return spec


def build(cfg, stage="pretrain", width=32, vocab_size=VOCAB):
    torch.manual_seed(0)
    model = create_model(cfg.model, image_size=cfg.data.image_size, vocab_size=vocab_size, spec=micro_spec(width),
                         mim_dim=lambda image_width: mim_dim_for(cfg, image_width))
    return create_pretrainer(cfg, stage, model, meta={"pad_token_id": 0, "cls_token_id": 101,
                                                       "sep_token_id": 102, "mask_token_id": 103})


def make_batch(n_images=4, captions=2, size=32, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = n_images * captions
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=g)
    images = images.repeat_interleave(captions, 0)
    ids = torch.randint(200, VOCAB, (b, length), generator=g)
    lengths = torch.randint(5, length + 1, (b,), generator=g)
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    ids = ids * attn
    batch = {"image": images, "image_id": torch.arange(n_images).repeat_interleave(captions),
             "caption_id": torch.arange(b), "input_ids": ids, "attention_mask": attn}
    batch["hog"] = hog(images, patch=8, cell=4, bins=9)
    return batch


COMBOS = {
    "denoising": ({}, {"itc", "itm", "mlm", "mim", "vicreg"}),
    "denoising-pixel": ({"objective__mim_target": "pixel"}, {"itc", "itm", "mlm", "mim", "vicreg"}),
    "denoising-no-itc": ({"objective__itc": False}, {"itm", "mlm", "mim", "vicreg"}),
    "denoising-uniform-itm": ({"objective__itc": False, "objective__vicreg": False,
                               "objective__itm_negatives": "uniform"}, {"itm", "mlm", "mim"}),
    "denoising-mim-only": ({"objective__itc": False, "objective__itm": False, "objective__mlm": False,
                            "objective__vicreg": False}, {"mim"}),
    "denoising-mlm-vicreg": ({"objective__itc": False, "objective__itm": False, "objective__mim": False},
                             {"mlm", "vicreg"}),
    "mamo": ({"objective__variant": "mamo"}, {"itc", "itm", "mlm", "mim", "mrm"}),
    "mamo-hog": ({"objective__variant": "mamo", "objective__mim_target": "hog"}, {"itc", "itm", "mlm", "mim", "mrm"}),
    "mamo-mrm-only": ({"objective__variant": "mamo", "objective__itc": False, "objective__itm": False,
                       "objective__mim": False, "objective__mlm": False}, {"mrm"}),
    "mamo-vicreg": ({"objective__variant": "mamo", "objective__vicreg": True},
                    {"itc", "itm", "mlm", "mim", "mrm", "vicreg"}),
}


@pytest.mark.parametrize("name", list(COMBOS))
def test_every_combination_runs(name):
    overrides, active = COMBOS[name]
    cfg = tiny_config(**overrides)
    pretrainer = build(cfg).train()
    batch = make_batch()
    if name == "denoising-pixel":
        del batch["hog"]  # computed on the fly
    out = pretrainer(batch)
    assert {k[5:] for k in out if k.startswith("loss_")} == active
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(not v.requires_grad for k, v in out.items() if k.startswith("diag_"))
    out["loss"].backward()
    expected = sum(getattr(cfg.objective, f"w_{k}") * out[f"loss_{k}"] for k in active)
    assert torch.allclose(out["loss"], expected)
    assert (pretrainer.ema is not None) == ("mrm" in active or name == "mamo")


def test_finetune_is_itc_plus_itm_without_ema():
    pretrainer = build(tiny_config(objective__variant="mamo"), stage="finetune")
    out = pretrainer(make_batch())
    assert {k for k in out if k.startswith("loss_")} == {"loss_itc", "loss_itm"}
    assert pretrainer.ema is None


def test_ema_gets_no_gradient_and_follows_the_model():
    pretrainer = build(tiny_config(objective__variant="mamo", objective__ema_warmup=False)).train()
    ema = pretrainer.ema.module
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    before = copy.deepcopy(ema.state_dict())
    pretrainer(make_batch())["loss"].backward()
    assert all(p.grad is None for p in ema.parameters())
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    assert pretrainer.model.vision.mask_token.grad is not None  # masked image branch trained
    with torch.no_grad():
        for p in pretrainer.model.parameters():
            p.add_(1.0)
    assert pretrainer.update_ema(7) == 0.995  # no warm-up: the fixed decay
    alpha = 0.995
    for (name, p), q in zip(pretrainer.model.named_parameters(), ema.parameters()):
        assert torch.allclose(q, alpha * before[name] + (1 - alpha) * p, atol=1e-6), name


def test_ema_warmup_schedule():
    """k-th update: decay min(alpha, 1 - k^-power), the first a copy; after 100 updates the
    warm-up teacher keeps a negligible share of its random initial weights, a fixed 0.995
    teacher keeps 0.995^100 = 61%."""
    power, alpha = 0.75, 0.995
    pretrainer = build(tiny_config(objective__variant="mamo", objective__ema_warmup_power=power,
                                   objective__ema_alpha=alpha))
    decays = [pretrainer.ema.get_decay(k) for k in range(1, 3001)]
    assert decays[0] == 0.0
    for k in (2, 10, 100, 1000):
        assert decays[k - 1] == pytest.approx(min(alpha, 1 - k ** -power))
    assert decays[2999] == alpha and all(a <= b for a, b in zip(decays, decays[1:]))
    share = {"warmup": 1.0, "fixed": 1.0}
    for k in range(1, 101):
        share["warmup"] *= decays[k - 1]
        share["fixed"] *= alpha
    assert share["warmup"] < 1e-6 and share["fixed"] == pytest.approx(0.6058, abs=1e-3)
    # the decay the Pretrainer reports is the one it applied
    with torch.no_grad():
        for p in pretrainer.model.parameters():
            p.add_(1.0)
    assert pretrainer.update_ema(1) == 0.0
    for p, q in zip(pretrainer.model.parameters(), pretrainer.ema.module.parameters()):
        assert torch.equal(p, q)  # the first update copies the model
    assert pretrainer.update_ema(50) == pytest.approx(1 - 50 ** -power)


def test_denoising_builds_no_ema():
    pretrainer = build(tiny_config())
    assert pretrainer.ema is None
    assert not any("ema" in name for name, _ in pretrainer.named_parameters())
    assert pretrainer.update_ema(1) is None  # a no-op


def test_mrm_target_does_not_pass_through_the_predictor():
    """With a predictor that outputs 0 the loss is E[target^2] = 1 for layer-normed targets;
    the seed's bug (targets through the online predictor) would give 0."""
    pretrainer = build(tiny_config(**COMBOS["mamo-mrm-only"][0]))
    last = pretrainer.mrm_predictor[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    out = pretrainer(make_batch())
    assert float(out["loss_mrm"].detach()) == pytest.approx(1.0, abs=1e-3)
    assert float(out["diag_mrm_target_std"]) > 0.1


def test_mim_target_counts_only_at_masked_patches():
    pretrainer = build(tiny_config(**COMBOS["denoising-mim-only"][0]))
    batch = make_batch()
    torch.manual_seed(5)
    base = pretrainer(batch)["loss_mim"]
    # recover the mask the step used: perturbing one patch's target changes the loss iff it was masked
    torch.manual_seed(5)
    from dmp_core.losses.masking import image_block_mask

    mask = image_block_mask(batch["image"].shape[0], pretrainer.model.grid_size, 0.75)
    moved = dict(batch, hog=batch["hog"].clone())
    moved["hog"][~mask] += 10.0
    torch.manual_seed(5)
    assert torch.equal(pretrainer(moved)["loss_mim"], base)
    moved["hog"][mask] += 1.0
    torch.manual_seed(5)
    assert not torch.equal(pretrainer(moved)["loss_mim"], base)


def _count_calls(module, names):
    counts = {name: [] for name in names}
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            counts[_name].append(args[0].shape[0])
            return _original(*args, **kwargs)

        setattr(module, name, wrapper)
    return counts


def test_no_redundant_passes():
    names = ("encode_image", "encode_text", "fuse")
    pretrainer = build(tiny_config(objective__itm_loss="binary"))
    calls = _count_calls(pretrainer.model, names)
    pretrainer(make_batch())
    b = 8
    # ITM: B positives + 2B hard + 2B uniform negatives; MIM and MLM: B each
    assert calls == {"encode_image": [2 * b], "encode_text": [2 * b], "fuse": [5 * b + b + b]}
    # without masked objectives no masked encodings are computed
    pretrainer = build(tiny_config(**COMBOS["denoising-mim-only"][0]
                                   | {"objective__mim": False, "objective__itc": True, "objective__itm": True,
                                      "objective__itm_loss": "binary"}))
    calls = _count_calls(pretrainer.model, names)
    pretrainer(make_batch())
    assert calls == {"encode_image": [b], "encode_text": [b], "fuse": [5 * b]}
    # MAMO: the EMA runs once per tower, and its fusion once (clean pair)
    pretrainer = build(tiny_config(objective__variant="mamo", objective__itm_loss="binary"))
    calls, ema_calls = _count_calls(pretrainer.model, names), _count_calls(pretrainer.ema.module, names)
    pretrainer(make_batch())
    assert calls == {"encode_image": [2 * b], "encode_text": [2 * b], "fuse": [7 * b]}
    assert ema_calls == {"encode_image": [b], "encode_text": [b], "fuse": [b]}


def test_uniform_negatives_add_one_easy_pair_per_anchor_and_direction():
    names = ("fuse",)
    b = 8
    pretrainer = build(tiny_config(objective__itm_uniform_negatives=False, objective__mim=False, objective__mlm=False,
                                   objective__itm_loss="binary"))
    calls = _count_calls(pretrainer.model, names)
    pretrainer(make_batch())
    assert calls == {"fuse": [b + 2 * b]}  # ALBEF: positives and hard pairs
    pretrainer = build(tiny_config(objective__itm_uniform_negatives=True, objective__mim=False, objective__mlm=False,
                                   objective__itm_loss="binary"))
    calls = _count_calls(pretrainer.model, names)
    out = pretrainer(make_batch())
    assert calls == {"fuse": [b + 2 * b + 2 * b]}  # positives, hard pairs, uniform pairs
    # the ITM labels' prior is now 1:4: the loss at a constant logit pair equals its entropy
    assert torch.isfinite(out["loss_itm"])


def test_listwise_itm_fuses_each_group_once():
    """Listwise ITM fuses the B positives and each anchor's valid neighbours, in both
    directions (4 images x 2 captions leave 6 candidates of other images per anchor); with
    ``itm_loss=both`` one uniform negative per anchor and direction follows for the binary loss."""
    names = ("fuse",)
    b = 8
    for mode, extra in (("listwise", 0), ("both", 2 * b)):
        for k, valid in ((3, 3), (7, 6)):
            pretrainer = build(tiny_config(objective__itm_group_size=k, objective__itm_loss=mode,
                                           objective__mim=False, objective__mlm=False))
            calls = _count_calls(pretrainer.model, names)
            out = pretrainer(make_batch())
            assert calls == {"fuse": [b + 2 * b * valid + extra]}, (mode, k)
            assert torch.isfinite(out["loss_itm"]) and 0.0 <= float(out["diag_itm_itc_p"]) <= 1.0
            assert ("diag_itm_binary" in out) == (mode == "both")


def test_listwise_itm_starts_at_the_itc_term_alone():
    """With the re-ranking head at zero, the listwise loss is the cross-entropy of
    stop_grad(ITC similarity) / rerank_tau over each group: the head's last layer (and the
    weight on the ITM margin) get the first gradients, the layers below none yet."""
    pretrainer = build(tiny_config(objective__itm_loss="listwise", objective__mim=False, objective__mlm=False,
                                   objective__vicreg=False))
    torch.manual_seed(0)
    out = pretrainer(make_batch())
    out["loss_itm"].backward()
    head = pretrainer.model.rank_head
    assert head[-1].weight.grad.abs().sum() > 0 and pretrainer.model.rank_margin_weight.grad != 0
    assert head[0].weight.grad is None or float(head[0].weight.grad.abs().sum()) == 0.0
    # the loss equals the ITC term's cross-entropy over the groups
    assert float(out["loss_itm"].detach()) > 0.0


def test_hard_negative_ramp_goes_from_uniform_to_the_softmax():
    pretrainer = build(tiny_config(objective__itm_hard_warmup=0.5))
    for progress, expected in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        pretrainer.progress = progress
        assert pretrainer.hardness() == pytest.approx(expected)
    assert build(tiny_config()).hardness() == 1.0  # no ramp: hard from the first step


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_deterministic_given_the_seed(bf16):
    """Same seed, same losses, in fp32 and under bf16 autocast (``pretrain.amp``) alike."""
    outs = []
    for _ in range(2):
        pretrainer = build(tiny_config(objective__variant="mamo"))
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = pretrainer(make_batch())
        out["loss"].backward()
        outs.append({**out, "grad": torch.cat([p.grad.flatten() for p in pretrainer.parameters()
                                                if p.grad is not None])})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_patch_size_must_match_targets():
    with pytest.raises(ParamsError, match="targets.patch=16"):
        tiny_config(targets__patch=16, targets__hog__cell=8)  # refused when params are loaded


def test_vicreg_expander_follows_the_global_batch_and_logs_its_floor():
    from dmp_core.training.meta_arch import vicreg_cov_floor

    pretrainer = build(tiny_config(objective__vicreg_coeffs__expander_dim=None))
    assert pretrainer.expander_dim == 8 and pretrainer.image_expander[-1].out_features == 8  # batch_size 8
    assert pretrainer.cov_floor == vicreg_cov_floor(8, 8) == pytest.approx(2 * (8 / 7 - 1))
    wide = build(tiny_config(objective__vicreg_coeffs__expander_dim=64))
    out = wide(make_batch())
    assert float(out["diag_vicreg_cov_floor"]) == pytest.approx(2 * (64 / 7 - 1))
    # the floor is real: even a perfect whitening of 8 samples leaves that much covariance
    from dmp_core.losses.vicreg import _covariance

    z = torch.randn(8, 64)
    z = (z - z.mean(0)) / z.std(0)
    assert float(_covariance(z)) >= (64 / 7 - 1) - 1e-4


@pytest.mark.parametrize("variant", ["denoising", "mamo"])
def test_overfit_one_batch(variant):
    cfg = tiny_config(objective__variant=variant)
    pretrainer = build(cfg).train()
    batch = make_batch()
    params = [p for p in pretrainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=4e-3, weight_decay=0.0)
    torch.manual_seed(0)
    history = []
    for _ in range(60):
        out = pretrainer(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        pretrainer.update_ema(len(history) + 1)
        history.append({k: float(v.detach()) for k, v in out.items() if k.startswith("loss")})
    for term in history[0]:
        first = sum(h[term] for h in history[:5]) / 5
        last = sum(h[term] for h in history[-5:]) / 5
        assert last < 0.9 * first, (term, first, last)


@pytest.mark.parametrize("variant", ["mamo", "denoising"])
def test_bench_step_reports_what_it_ran(variant):
    from dmp_core.benchmarks.step import bench_step

    out = bench_step(tiny_config(), variant=variant, preset="tiny", batch=4, steps=1, warmup=0)
    assert out["variant"] == variant and out["ema"] == (variant == "mamo")
    assert out["steps"] == 1 and out["pairs_per_s"] > 0 and out["peak_rss_mb"] > 0
    assert ("mrm" in out["objectives"]) == (variant == "mamo")


def test_listwise_groups_read_each_fused_score_from_its_own_pair():
    """Each group column gets the correction r of the pair fused for it, swapped captions
    included: with r set to the pair's own index in the fusion call, the groups must hold
    the indices of their pairs, in fusion order (positives, image groups, caption groups, swaps)."""
    pretrainer = build(tiny_config(objective__itm_loss="listwise", objective__mim=False, objective__mlm=False))
    torch.manual_seed(0)
    batch = make_batch()
    b = batch["input_ids"].shape[0]
    seen = {}

    def fake_listwise(margin, groups):
        seen["margin"], seen["groups"] = margin, groups
        return {"loss": margin.sum() * 0}

    pretrainer._listwise_itm = fake_listwise
    pretrainer(batch)
    margin, groups = seen["margin"], seen["groups"]
    n_i2t, n_t2i = int(groups["i2t"][1].sum()), int(groups["t2i"][1].sum())
    assert len(margin) == b + n_i2t + n_t2i + (int(groups["swap"][1].sum()) if groups["swap"] is not None else 0)
    # the real function on index-valued corrections: the i2t columns are the pairs b .. b + n_i2t
    from dmp_core.training.meta_arch import Pretrainer

    index = torch.arange(len(margin), dtype=torch.float32)
    captured = {}
    real = Pretrainer._listwise_itm

    def spy_scores(sim, m, tau, itc_weight=1.0):
        captured.setdefault("m", []).append(m)
        return m

    import dmp_core.training.meta_arch as meta
    original = meta.residual_scores
    meta.residual_scores = spy_scores
    try:
        real(pretrainer, index, groups)
    finally:
        meta.residual_scores = original
    i2t, t2i = captured["m"]
    ok_t, ok_i = groups["i2t"][1], groups["t2i"][1]
    assert torch.equal(i2t[:, 0], torch.arange(b, dtype=torch.float32))
    assert torch.equal(i2t[:, 1:1 + ok_t.shape[1]][ok_t], torch.arange(b, b + n_i2t, dtype=torch.float32))
    assert torch.equal(t2i[:, 1:][ok_i], torch.arange(b + n_i2t, b + n_i2t + n_t2i, dtype=torch.float32))
