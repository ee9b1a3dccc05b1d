"""The training loop: schedule shape, weight-decay groups, data order, ITC recall, short
pretrain (both variants) and finetune runs on the tiny dataset, and the NaN stop."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from dmp_core.config import TrainParams
from dmp_core.errors import TrainingError
from dmp_core.training.schedule import build_optimizer, build_scheduler
from dmp_core.training.loop import EpochBatchSampler, itc_recall, run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


# ------------------------------------------------------------------ schedule
def test_schedule_linear_warmup_then_cosine_to_min_at_last_step():
    train = TrainParams(steps=None, epochs=3, warmup=1 / 6, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    total = 30  # 3 epochs of 10 steps
    opt = build_optimizer(torch.nn.Linear(4, 4), train)
    sched = build_scheduler(opt, train, total_steps=total)
    lrs = []
    for step in range(total):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    warm = 5  # a sixth of the run
    for step in range(warm):  # linear from warmup_lr towards lr
        assert lrs[step] == pytest.approx(1e-6 + step * (1e-3 - 1e-6) / warm, rel=1e-9)
    assert lrs[warm] == pytest.approx(1e-3)  # the peak right after warmup
    span = total - 1 - warm
    for step in range(warm, total):  # cosine over the remaining steps
        ref = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * (step - warm) / span)) / 2
        assert lrs[step] == pytest.approx(ref, rel=1e-9)
    assert all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-9)  # the minimum exactly at the last step
    assert lrs[-2] > 1e-5  # ... and not before (the seed's schedule sat at the minimum)


def test_fused_side_holds_its_peak_then_decays_to_min_at_the_last_step():
    from dmp_core.training.schedule import is_fusion_side

    train = TrainParams(steps=40, warmup=0.1, lr=1e-3, fusion_lr_scale=2.0, fusion_lr_hold=0.5, min_lr=1e-5)
    model = torch.nn.ModuleDict({"vision": torch.nn.Linear(4, 4), "fusion": torch.nn.Linear(4, 4)})
    opt = build_optimizer(model, train)
    sched = build_scheduler(opt, train, total_steps=40)
    towers, fused = [], []
    for step in range(40):
        sched.step_update(step)
        towers.append(next(g["lr"] for g in opt.param_groups if not g["fused"]))
        fused.append(next(g["lr"] for g in opt.param_groups if g["fused"]))
    assert all(is_fusion_side(n) == any(p is q for g in opt.param_groups if g["fused"] for q in g["params"])
               for n, p in model.named_parameters())
    assert fused[:4] == pytest.approx([2 * t for t in towers[:4]])  # the same warmup
    assert fused[4:21] == pytest.approx([2e-3] * 17)  # held at the peak until half the run
    assert towers[20] < 0.6e-3  # while the towers decay
    assert all(a > b for a, b in zip(fused[20:], fused[21:]))
    assert fused[-1] == pytest.approx(2e-5) and towers[-1] == pytest.approx(1e-5)


def test_warmup_is_a_share_of_the_run():
    from dmp_core.training.schedule import warmup_steps_for

    train = TrainParams(warmup=0.25)
    assert warmup_steps_for(train, total_steps=400) == 100
    assert warmup_steps_for(train, total_steps=40) == 10
    assert warmup_steps_for(TrainParams(warmup=0.99), total_steps=8) == 7  # never the whole run
    assert warmup_steps_for(TrainParams(warmup=0.0), total_steps=8) == 0


def test_run_length_is_steps_xor_epochs():
    from dmp_core.config import ParamsError

    with pytest.raises(ParamsError, match="exactly one of steps and epochs"):
        tiny_config(pretrain__epochs=2)  # steps is set too
    with pytest.raises(ParamsError, match="exactly one of steps and epochs"):
        tiny_config(pretrain__steps=None)
    assert tiny_config(pretrain__steps=None, pretrain__epochs=2).pretrain.epochs == 2


def test_no_weight_decay_on_biases_norms_temperature_and_mask_tokens():
    from dmp_core.training.meta_arch import create_pretrainer
    from dmp_core.models import model_from_config

    cfg = tiny_config(objective__variant="mamo")  # mamo: also has an EMA model (never optimised)
    model = model_from_config(cfg, 30522)
    pretrainer = create_pretrainer(cfg, "pretrain", model)
    opt = build_optimizer(pretrainer, cfg.pretrain)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    seen = 0
    for name, p in pretrainer.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay_of, f"frozen {name} is optimised"
            continue
        seen += 1
        leaf = name.split(".")[-1]
        excluded = (leaf == "bias" or p.ndim == 1 or leaf in ("temp", "rank_margin_weight") or "mask_token" in name
                    or "norm" in name.lower() and leaf == "weight"
                    or leaf in ("pos_embed", "cls_token", "cls") or "position_embeddings" in name
                    or "type_embeddings" in name)
        assert decay_of[id(p)] == (0.0 if excluded else cfg.pretrain.weight_decay), name
    assert seen == len(decay_of)
    names = dict(pretrainer.named_parameters())
    assert decay_of[id(names["model.temp"])] == 0.0
    assert any("mask_token" in n and decay_of[id(p)] == 0.0 for n, p in names.items() if p.requires_grad)
    assert any(n.startswith("ema.") for n in names)


# ------------------------------------------------------------------ data order
def test_epoch_batch_sampler_shards_and_resumes():
    single = EpochBatchSampler(50, 8, seed=3)
    assert single.steps_per_epoch == 6  # the incomplete last batch is dropped
    single.set_position(epoch=1)
    full = list(single)
    assert all(e == 1 for batch in full for e, _ in batch)
    idx = [i for batch in full for _, i in batch]
    assert len(set(idx)) == len(idx) == 48
    # two ranks with half the batch: the union of their step-b batches is the single-process batch b
    ranks = [EpochBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_position(epoch=1)
    sharded = [list(r) for r in ranks]
    for b in range(6):
        assert sorted(sharded[0][b] + sharded[1][b]) == sorted(full[b])
        assert not set(sharded[0][b]) & set(sharded[1][b])
    # resuming at batch 4 yields exactly the remaining batches
    single.set_position(epoch=1, start_batch=4)
    assert list(single) == full[4:] and len(single) == 2
    # another epoch, another order; the same epoch, the same order
    single.set_position(epoch=2)
    assert list(single) != full
    single.set_position(epoch=1)
    assert list(single) == full


def test_itc_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(12, 5, generator=gen), dim=1)
    txt2img = np.repeat(np.arange(6), 2)
    got = itc_recall(img, txt, txt2img)
    sim = (img @ txt.T).tolist()
    tr_hits = {k: 0 for k in (1, 5, 10)}
    for i in range(6):
        order = sorted(range(12), key=lambda t: -sim[i][t])
        first_gold = min(order.index(t) for t in range(12) if txt2img[t] == i)
        for k in tr_hits:
            tr_hits[k] += first_gold < k
    ir_hits = {k: 0 for k in (1, 5, 10)}
    for t in range(12):
        order = sorted(range(6), key=lambda i: -sim[i][t])
        for k in ir_hits:
            ir_hits[k] += order.index(txt2img[t]) < k
    for k in (1, 5, 10):
        assert got[f"tr_r{k}"] == pytest.approx(100 * tr_hits[k] / 6)
        assert got[f"ir_r{k}"] == pytest.approx(100 * ir_hits[k] / 12)
    assert got["r_mean"] == pytest.approx((sum(tr_hits.values()) / 6 + sum(ir_hits.values()) / 12) * 100 / 6)


# ------------------------------------------------------------------ short real runs
METRIC_KEYS = {"steps", "epochs", "best_step", "val_r_mean_best", "val_r_mean_final", "val_best", "val_final",
               "loss_final", "wall_time_s", "pairs_per_s", "peak_rss_mb"}


def check_stage_outputs(cfg, stage, models, reports, active):
    """The files a finished stage leaves (shared with test_tracking.py)."""
    out = models / stage
    assert (out / "model.safetensors").read_bytes() == (out / "checkpoints" / "best.safetensors").read_bytes()
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["done"] and latest["fingerprint"]["stage"] == stage
    metrics = json.loads((reports / stage / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    history = pd.read_csv(reports / stage / "history.csv")
    assert list(history["step"]) == list(range(1, metrics["steps"] + 1))
    from dmp_core.training.meta_arch import LOSS_TERMS

    for name in active:
        assert f"loss_{name}" in history.columns and history[f"loss_{name}"].notna().all(), name
    assert {"step", "epoch", "lr", "loss", "temperature", "pairs_per_s"} <= set(history.columns)
    # every term of the stage has a column (for `dvc plots`); unused ones are empty
    assert {f"loss_{t}" for t in LOSS_TERMS[stage]} == {c for c in history.columns if c.startswith("loss_")}
    for term in set(LOSS_TERMS[stage]) - set(active):
        assert history[f"loss_{term}"].isna().all(), term
    val = pd.read_csv(reports / stage / "val_history.csv")
    assert val["itm_auc"].between(0, 1).all() and val["image_use_gap"].notna().all()
    best = val.loc[val["r_mean"].idxmax()]
    assert metrics["best_step"] == int(best["step"]) and metrics["val_r_mean_best"] == pytest.approx(best["r_mean"])
    run = json.loads((reports / stage / "run.json").read_text())
    assert run["stage"] == stage and run["run_id"] and run["tracking_uri"] == cfg.tracking.uri
    return metrics


def test_pretraining_sees_its_data_fraction_and_finetuning_every_image(tiny_data):
    """pretrain.data_fraction: the pretraining loader draws only from the nested subset (for
    as many epochs as the steps need); finetuning's loader draws from every training image."""
    from dmp_core.training.loop import DistInfo, _build_data, pretrain_images, train_params

    cfg = tiny_config(pretrain__data_fraction=0.25, pretrain__captions="all", finetune__captions="all")
    seen = {}
    for stage in ("pretrain", "finetune"):
        lines = []
        dataset, sampler, loader = _build_data(cfg, stage, train_params(cfg, stage), tiny_data["prepared"],
                                               tiny_data["targets"], DistInfo(), None, lines.append)
        ids = set()
        for epoch in range(3):
            sampler.set_position(epoch)
            for batch in loader:
                ids |= set(batch["image_id"].tolist())
        seen[stage] = (ids, dataset.num_images, lines)
    n_images = seen["finetune"][1]
    keep = set(pretrain_images(n_images, 0.25, cfg.seed).tolist())
    assert seen["pretrain"][0] <= keep and len(seen["pretrain"][0]) > len(keep) // 2
    assert seen["pretrain"][1] == len(keep) and "pretraining sees" in seen["pretrain"][2][0]
    assert len(seen["finetune"][0]) > len(keep) and not seen["finetune"][2]
    with pytest.raises(Exception, match="pretrain.data_fraction=1"):
        tiny_config(pretrain__data_fraction=0.5, pretrain__neighbour_batches=4)


@pytest.mark.slow
def test_short_mamo_pretrain(tiny_data, tmp_path, store):
    """Pretrain 4 steps (val every 2 -> best-weights selection) with the EMA variant; the best
    weights load with dmp_core.evaluation.retrieval. (The denoising pretrain + finetune run against a
    real mlflow server in test_tracking.py, with the same output checks.)"""
    from dmp_core.evaluation.retrieval import load_model

    cfg = tiny_config(tracking__uri=store, objective__variant="mamo", pretrain__steps=4, pretrain__val_every=2)
    models, reports = tmp_path / "models", tmp_path / "reports"
    metrics = run_training(cfg, "pretrain", prepared_dir=tiny_data["prepared"], targets_dir=tiny_data["targets"],
                           out_dir=models / "pretrain", reports_dir=reports / "pretrain")
    assert metrics["steps"] == 4
    active = cfg.objective.resolve().active
    assert "mrm" in active and "vicreg" not in active
    check_stage_outputs(cfg, "pretrain", models, reports, active)
    history = pd.read_csv(reports / "pretrain" / "history.csv")  # the EMA decay of every step
    assert history["ema_decay"].tolist() == pytest.approx([min(0.995, 1 - k ** -0.75) if k > 1 else 0.0
                                                           for k in range(1, 5)])
    load_model(cfg, models / "pretrain" / "model.safetensors", vocab_size=30522)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_term_and_checkpoint(tiny_data, tmp_path, store, monkeypatch):
    import dmp_core.training.meta_arch as meta_arch

    real_itc, calls = meta_arch.itc_loss, []

    def itc_turning_nan(*args, **kwargs):
        calls.append(1)
        loss = real_itc(*args, **kwargs)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(meta_arch, "itc_loss", itc_turning_nan)
    cfg = tiny_config(tracking__uri=store, pretrain__steps=6, pretrain__checkpoint_every=2)
    out = tmp_path / "models" / "pretrain"
    with pytest.raises(TrainingError) as info:
        run_training(cfg, "pretrain", prepared_dir=tiny_data["prepared"], targets_dir=tiny_data["targets"],
                     out_dir=out, reports_dir=tmp_path / "reports" / "pretrain")
    msg = str(info.value)
    assert "\n" not in msg
    assert "loss_itc=nan" in msg and "step 3" in msg
    assert f"{out / 'checkpoints' / 'latest.json'} (step 2)" in msg
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2 and not latest["done"]


def test_neighbour_batches_hold_groups_of_neighbours_each_image_once_and_replay_exactly():
    from dmp_core.training.sampling import NeighbourBatchSampler

    n_images, per_image = 40, 2
    item_image = np.repeat(np.arange(n_images), per_image)  # captions: all (2 items per image)
    neighbours = np.stack([(np.arange(1, 6) + i) % n_images for i in range(n_images)])  # i's neighbours: i+1..i+5
    sampler = NeighbourBatchSampler(len(item_image), 8, seed=3, item_image=item_image, neighbours=neighbours, group=4)
    batches = [[i for _, i in b] for b in sampler]
    assert len(batches) == sampler.steps_per_epoch == len(item_image) // 8
    for batch in batches:
        images = [int(item_image[i]) for i in batch]
        assert len(batch) == 8 and len(set(images)) == 8  # each image once per batch
        for start in (0, 4):  # two groups of 4: an anchor and 3 of its neighbours
            anchor, *rest = images[start:start + 4]
            assert set(rest) <= set(neighbours[anchor].tolist())
    again = NeighbourBatchSampler(len(item_image), 8, seed=3, item_image=item_image, neighbours=neighbours, group=4)
    again.set_position(0, 2)  # resumed at batch 2: the same batches from there on
    assert [[i for _, i in b] for b in again] == batches[2:]
    with pytest.raises(ValueError, match="distinct images"):
        NeighbourBatchSampler(20, 8, seed=0, item_image=np.repeat(np.arange(5), 4), neighbours=neighbours[:5], group=4)
