"""Retrieval evaluation: recall against a brute-force reference, re-ranking against
exhaustive ITM scoring on a real (random-init) tiny model, chunking, and the outputs
of the evaluate stage recomputed independently from scores.npz."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dmp_core.errors import CheckpointError, DataError
from dmp_core.evaluation.retrieval import (
    NOT_RERANKED,
    RetrievalSplit,
    compute_scores,
    encode_split,
    exhaustive_itm,
    img2txt_from_txt2img,
    retrieval_metrics,
)
from dmp_core.evaluation.evaluate import run_evaluate


# ------------------------------------------------------------ brute-force reference
def brute_force_recall(i2t, t2i, txt2img) -> dict[str, float]:
    """Sort every row with Python; a gold item tied with a non-gold one ranks after it."""
    n_images, n_texts = len(i2t), len(t2i)
    tr_ranks = []
    for i in range(n_images):
        order = sorted(range(n_texts), key=lambda t: (-float(i2t[i][t]), txt2img[t] == i))
        tr_ranks.append(min(pos for pos, t in enumerate(order) if txt2img[t] == i))
    ir_ranks = []
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda i: (-float(t2i[t][i]), i == txt2img[t]))
        ir_ranks.append(order.index(txt2img[t]))
    out = {}
    for name, ranks in (("tr", tr_ranks), ("ir", ir_ranks)):
        for k in (1, 5, 10):
            hits = 0
            for rank in ranks:
                if rank < k:
                    hits += 1
            out[f"{name}_r{k}"] = 100.0 * hits / len(ranks)
    out["tr_mean"] = (out["tr_r1"] + out["tr_r5"] + out["tr_r10"]) / 3
    out["ir_mean"] = (out["ir_r1"] + out["ir_r5"] + out["ir_r10"]) / 3
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 5, 10))
    return out


def assert_metrics_equal(got: dict, want: dict, prefix: str = "") -> None:
    for key, value in want.items():
        assert got[prefix + key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_images, per_image = 23, 5
    txt2img = rng.permutation(np.repeat(np.arange(n_images), per_image))  # captions in random order
    i2t = rng.standard_normal((n_images, len(txt2img)))  # continuous: no ties
    t2i = rng.standard_normal((len(txt2img), n_images))
    # make some queries easy so that every recall level is exercised
    i2t[np.arange(n_images), [np.flatnonzero(txt2img == i)[0] for i in range(n_images)]] += 1.5
    t2i[np.arange(len(txt2img)), txt2img] += 1.0

    got = retrieval_metrics(i2t, t2i, txt2img, img2txt_from_txt2img(txt2img, n_images))
    want = brute_force_recall(i2t, t2i, txt2img.tolist())
    assert_metrics_equal(got, want)
    assert 0 < got["tr_r1"] < got["tr_r10"] < 100


def test_perfect_and_unreranked_scores() -> None:
    txt2img = np.array([0, 0, 1, 1, 2, 2])
    perfect_i2t = (txt2img[None, :] == np.arange(3)[:, None]).astype(float)
    got = retrieval_metrics(perfect_i2t, perfect_i2t.T, txt2img, img2txt_from_txt2img(txt2img, 3))
    assert got["tr_r1"] == got["ir_r1"] == 100.0 and got["rsum"] == 600.0
    # a gold pair left at -100 outside the top-k is not retrieved, even if all others tie with it
    flat = np.full((3, 6), NOT_RERANKED)
    got = retrieval_metrics(flat, flat.T, txt2img, img2txt_from_txt2img(txt2img, 3))
    assert got["tr_r1"] == got["ir_r1"] == 0.0


def test_retrieval_metrics_rejects_bad_shapes() -> None:
    txt2img = np.array([0, 1])
    with pytest.raises(DataError, match="t2i has shape"):
        retrieval_metrics(np.zeros((2, 2)), np.zeros((3, 2)), txt2img, [[0], [1]])


# ------------------------------------------------------------ the real tiny model
def _model(seed: int, prepared: Path, zero_head: bool = False):
    """The real tiny DMPModel, randomly initialised with ``seed``. A fresh model's re-ranking
    head ends in a zero layer (no correction to ITC for any pair); unless ``zero_head``, that
    layer is drawn at random too, so that the residual re-ranker re-orders."""
    from dmp_core.models import model_from_config

    torch.manual_seed(seed)
    cfg = tiny_config(model__pretrained=False)
    meta = json.loads((prepared / "meta.json").read_text())
    model = model_from_config(cfg, meta["vocab_size"]).eval()
    if not zero_head:
        torch.nn.init.normal_(model.rank_head[-1].weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def split(tiny_data) -> RetrievalSplit:
    return RetrievalSplit.from_prepared(tiny_data["prepared"], "test")


@pytest.fixture(scope="module")
def model_and_exhaustive(tiny_data, split):
    model = _model(0, tiny_data["prepared"])
    enc = encode_split(model, split, batch_size=16, device="cpu")
    return model, exhaustive_itm(model, enc, itm_batch_size=64)


@pytest.fixture(scope="module")
def exhaustive_residual(split, model_and_exhaustive):
    """The re-ranking head's correction r of every (image, text) pair, [images, texts]."""
    from dmp_core.evaluation.retrieval import pair_scores

    model = model_and_exhaustive[0]
    enc = encode_split(model, split, batch_size=16, device="cpu")
    images = torch.arange(split.n_images).repeat_interleave(split.n_texts)
    texts = torch.arange(split.n_texts).repeat(split.n_images)
    return pair_scores(model, enc, images, texts, 64)[1].numpy().reshape(split.n_images, split.n_texts)


def test_rerank_with_k_covering_the_split_equals_exhaustive(split, model_and_exhaustive, exhaustive_residual) -> None:
    model, full = model_and_exhaustive
    scores = compute_scores(model, split, k_test=10_000, batch_size=16, itm_batch_size=64)  # k clipped
    np.testing.assert_allclose(scores["itm_i2t"], full, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores["itm_t2i"], full.T, rtol=0, atol=1e-5)
    assert (scores["itm_i2t"] > NOT_RERANKED).all()
    # the headline: the residual score w * s / tau + r on the same candidates
    assert np.abs(exhaustive_residual).max() > 0.1  # the head re-orders
    np.testing.assert_allclose(scores["i2t"], scores["itc_i2t"] / 0.05 + exhaustive_residual, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores["itm_itc_i2t"], scores["itc_i2t"] + full, rtol=0, atol=1e-5)


def test_rerank_keeps_top_k_and_chunking_changes_nothing(split, model_and_exhaustive) -> None:
    model, full = model_and_exhaustive
    k = 5
    one = compute_scores(model, split, k_test=k, batch_size=16, itm_batch_size=64, chunk_size=10_000)
    chunked = compute_scores(model, split, k_test=k, batch_size=7, itm_batch_size=9, chunk_size=3)
    for key in ("i2t", "t2i", "itm_i2t", "itm_t2i", "itc_i2t", "itc_t2i"):
        np.testing.assert_allclose(chunked[key], one[key], rtol=0, atol=1e-4, err_msg=key)

    for query in range(split.n_images):  # loops: an independent check of the top-k rule
        kept = [t for t in range(split.n_texts) if one["itm_i2t"][query, t] > NOT_RERANKED]
        assert len(kept) == k
        ranked = sorted(range(split.n_texts), key=lambda t: -one["itc_i2t"][query, t])
        kth = one["itc_i2t"][query, ranked[k - 1]]  # ties at the k-th score (duplicate captions) may go either way
        assert all(one["itc_i2t"][query, t] >= kth for t in kept)
        assert set(ranked[:k]) - set(kept) <= {t for t in ranked if one["itc_i2t"][query, t] == kth}
        for t in kept:
            assert one["itm_i2t"][query, t] == pytest.approx(full[query, t], abs=1e-5)
        # the rest stay below every candidate, in ITC's order
        rest = [t for t in ranked if t not in kept]
        assert max(one["itm_i2t"][query, rest]) < min(one["itm_i2t"][query, kept])
        assert all(one["itm_i2t"][query, a] >= one["itm_i2t"][query, b] for a, b in zip(rest, rest[1:]))
    assert ((one["itm_t2i"] > NOT_RERANKED).sum(axis=1) == k).all()


def _save_weights(model, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_run_evaluate_outputs_recompute_independently(tiny_data, split, tmp_path, capsys) -> None:
    from dmp_core.stats import chance_recall, recalls_from_ranks

    cfg = tiny_config(eval__k_test=6)
    models = {
        "pretrain": _save_weights(_model(1, tiny_data["prepared"]), tmp_path / "models/pretrain/model.safetensors"),
        "finetune": _save_weights(_model(2, tiny_data["prepared"]), tmp_path / "models/finetune/model.safetensors"),
    }
    reports = tmp_path / "reports"
    details = run_evaluate(cfg, tiny_data["prepared"], models, reports, device="cpu")
    assert "run.json absent" in capsys.readouterr().out  # no training runs: MLflow skipped, said once per model

    on_disk = json.loads((reports / "evaluate/details.json").read_text())
    assert on_disk == json.loads(json.dumps(details))
    assert on_disk["split"] == {"dataset": "synthetic", "name": "test", "image_size": 32,
                                "images": split.n_images, "texts": split.n_texts}
    assert on_disk["chance"] == pytest.approx(chance_recall(split.txt2img))
    npz = np.load(reports / "evaluate/scores.npz")
    ranks = np.load(reports / "evaluate/ranks.npz")
    assert npz["i2t"].shape == (split.n_images, split.n_texts) and npz["t2i"].shape == (split.n_texts, split.n_images)
    np.testing.assert_array_equal(npz["txt2img"], split.txt2img)
    np.testing.assert_array_equal(ranks["txt2img"], split.txt2img)
    _assert_clusters_are_the_binding_groups(ranks["clusters"], tiny_data["prepared"] / "test" / "images.json")
    np.testing.assert_array_equal(npz["i2t"], npz["finetune_i2t"])
    txt2img = npz["txt2img"].tolist()
    for name in ("pretrain", "finetune"):
        for scorer, prefix in (("rerank", ""), ("itm", "itm_"), ("itc", "itc_")):
            reference = brute_force_recall(npz[f"{name}_{prefix}i2t"], npz[f"{name}_{prefix}t2i"], txt2img)
            got = on_disk["models"][name][scorer]
            for key, value in reference.items():
                assert got[key] == pytest.approx(value), (name, scorer, key)
            from_ranks = recalls_from_ranks(ranks[f"{name}_{scorer}_tr"], ranks[f"{name}_{scorer}_ir"])
            for key in ("tr_r1", "ir_r5", "r_mean"):
                assert from_ranks[key] == pytest.approx(got[key])
        diag = on_disk["models"][name]["diagnostics"]
        # per-query AUCs: at most one image and one caption query per diag query, only those
        # whose ITC top-k holds both gold and non-gold candidates
        assert 0.0 <= diag["itm_auc"] <= 1.0 and 0 < diag["n_auc_queries"] <= 2 * split.n_images
        assert diag["itm_auc_lo"] <= diag["itm_auc"] <= diag["itm_auc_hi"]
        assert 0.0 <= diag["itm_auc_random"] <= 1.0
        assert diag["image_use_gap"] == pytest.approx(diag["mlm_loss_shuffled"] - diag["mlm_loss_matched"])
        assert diag["text_use_gap"] == pytest.approx(diag["mim_loss_shuffled"] - diag["mim_loss_matched"])
    assert on_disk["models"]["pretrain"] != on_disk["models"]["finetune"]  # two models really were evaluated
    # metrics.json: the headline subset, the same numbers
    headline = json.loads((reports / "evaluate/metrics.json").read_text())
    ft = on_disk["models"]["finetune"]
    assert headline["finetune"] == {**{k: ft["rerank"][k] for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5",
                                                                      "ir_r10", "r_mean")},
                                    "itc_r_mean": ft["itc"]["r_mean"], "itm_r_mean": ft["itm"]["r_mean"]}
    assert headline["pretrain"] == {"itc_r_mean": on_disk["models"]["pretrain"]["itc"]["r_mean"]}
    pre = on_disk["models"]["pretrain"]["diagnostics"]
    assert headline["diagnostics"] == {
        "finetune_itm_auc": ft["diagnostics"]["itm_auc"],
        "finetune_itm_auc_random": ft["diagnostics"]["itm_auc_random"],
        "pretrain_image_use_gap_rel": pre["image_use_gap_rel"],
        "pretrain_text_use_gap_rel": pre["text_use_gap_rel"]}
    assert pre["image_use_gap_rel"] == pytest.approx(pre["image_use_gap"] / pre["mlm_loss_matched"])


def test_zero_head_reranks_to_the_exact_itc_ranks(tiny_data, split, tmp_path) -> None:
    """The evaluate stage on a model whose ITM head is still at zero: the residual
    re-ranker's ranks equal the ITC-only ranks, query for query, whatever k and ITC weight
    the val split chose; the seed's scorer (the margin alone, all tied at 0) does not. (No
    refit: with ``eval.rerank_fit_steps`` 0 the head is scored as trained.)"""
    cfg = tiny_config(eval__k_test=12, eval__rerank_ks=[4, 12], eval__rerank_itc_weights=[0.5, 3.0],
                      eval__rerank_fit_steps=0)
    models = {"finetune": _save_weights(_model(3, tiny_data["prepared"], zero_head=True),
                                        tmp_path / "models/finetune/model.safetensors")}
    details = run_evaluate(cfg, tiny_data["prepared"], models, tmp_path / "reports", device="cpu", log_mlflow=False)
    ranks = np.load(tmp_path / "reports/evaluate/ranks.npz")
    for direction in ("tr", "ir"):
        np.testing.assert_array_equal(ranks[f"finetune_rerank_{direction}"], ranks[f"finetune_itc_{direction}"])
    entry = details["models"]["finetune"]
    assert entry["rerank"] == entry["itc"]
    assert entry["rerank_choice"]["k"] in (4, 12) and entry["rerank_choice"]["itc_weight"] in (0.5, 3.0)
    diag = entry["diagnostics"]
    assert diag["rerank_up"] == diag["rerank_down"] == diag["rerank_net"] == 0
    assert diag["rerank_same"] == diag["rerank_queries"] > 0
    assert diag["itm_down"] > 0  # ties at margin 0 count against the query: the seed's scorer loses here


def _assert_clusters_are_the_binding_groups(clusters: np.ndarray, images_json: Path) -> None:
    """ranks.npz ``clusters``: one int id per image; images share an id iff they share a non-null group."""
    groups = [entry.get("group") for entry in json.loads(images_json.read_text())]
    assert clusters.dtype == np.int64 and clusters.shape == (len(groups),)
    assert any(g is not None for g in groups)  # the tiny synthetic test split has binding groups
    for i, j in zip(*np.triu_indices(len(groups), k=1)):
        same_group = groups[i] is not None and groups[i] == groups[j]
        assert (clusters[i] == clusters[j]) == same_group, (i, j, groups[i], groups[j])
    assert sorted(set(clusters.tolist())) == list(range(len(set(clusters.tolist()))))  # 0..C-1


def test_the_val_gate_decides_from_its_interval_and_a_reset_gives_itc_ranks(tiny_data, split, tmp_path) -> None:
    """``eval.rerank_gate`` on the real evaluate path: the model records its val gain over
    ITC with the bootstrap interval, and the re-ranker is kept exactly when the interval
    lies above 0. A random model's head (scored as it is: ``eval.rerank_fit_steps`` 0)
    re-orders val's top-k without knowing anything (on this seed it gains +1.6 on val by
    chance, inside [-2.1, +5.2]): it is reset to zero, and the test ranks of the re-ranker
    are ITC's, query for query."""
    cfg = tiny_config(eval__k_test=8, eval__rerank_gate=0.9, eval__rerank_fit_steps=0)
    models = {"finetune": _save_weights(_model(5, tiny_data["prepared"]), tmp_path / "models/finetune/model.safetensors")}
    details = run_evaluate(cfg, tiny_data["prepared"], models, tmp_path / "reports", device="cpu", log_mlflow=False)
    entry = details["models"]["finetune"]
    gate, diag = entry["rerank_choice"]["gate"], entry["diagnostics"]
    assert gate["level"] == 0.9 and gate["lo"] <= gate["diff"] <= gate["hi"]
    assert gate["kept"] == (gate["lo"] > 0) == bool(diag["rerank_kept"])
    assert (diag["rerank_val_gain"], diag["rerank_val_gain_lo"], diag["rerank_val_gain_hi"]) == (
        gate["diff"], gate["lo"], gate["hi"])
    assert gate["diff"] != 0 and gate["hi"] > gate["lo"]  # the random head did re-order val's top-k
    assert not gate["kept"]  # ... knowing nothing: reset
    ranks = np.load(tmp_path / "reports/evaluate/ranks.npz")
    for direction in ("tr", "ir"):
        np.testing.assert_array_equal(ranks[f"finetune_rerank_{direction}"], ranks[f"finetune_itc_{direction}"])
    assert entry["rerank"] == entry["itc"]


def test_run_evaluate_stops_on_a_bad_group_before_scoring(tiny_data, tmp_path) -> None:
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_data["prepared"], prepared)
    info = json.loads((prepared / "test/images.json").read_text())
    info[3]["group"] = "pair-1"
    (prepared / "test/images.json").write_text(json.dumps(info))
    with pytest.raises(DataError) as err:
        run_evaluate(tiny_config(), prepared, {"finetune": tmp_path / "never-loaded.safetensors"}, tmp_path,
                     device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "test/images.json" in msg and "[3].group" in msg and "'pair-1'" in msg


def test_run_evaluate_logs_to_the_training_runs(tiny_data, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    reports = tmp_path / "reports"
    (reports / "finetune").mkdir(parents=True)
    (reports / "finetune/run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
    weights = _save_weights(_model(0, tiny_data["prepared"]), tmp_path / "m.safetensors")
    details = run_evaluate(tiny_config(), tiny_data["prepared"], {"finetune": weights}, reports, device="cpu")
    logged = client.get_run(run.info.run_id).data.metrics
    entry = details["models"]["finetune"]
    assert logged["test_itm_ir_r1"] == pytest.approx(entry["itm"]["ir_r1"])
    assert logged["test_diag_itm_auc"] == pytest.approx(entry["diagnostics"]["itm_auc"])
    assert f"to run {run.info.run_id}" in capsys.readouterr().out


def test_missing_or_foreign_weights_are_one_line_errors(tiny_data, tmp_path) -> None:
    cfg = tiny_config()
    with pytest.raises(CheckpointError, match="model weights not found") as err:
        run_evaluate(cfg, tiny_data["prepared"], {"finetune": tmp_path / "nope.safetensors"}, tmp_path, device="cpu")
    assert "\n" not in str(err.value)
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not match model preset"):
        run_evaluate(cfg, tiny_data["prepared"], {"finetune": tmp_path / "other.safetensors"}, tmp_path, device="cpu")


def test_bench_eval_agrees_when_k_covers_the_subset(tiny_data) -> None:
    from dmp_core.benchmarks.eval import bench_eval

    cfg = tiny_config(eval__k_test=64)
    result = bench_eval(cfg, subset=6, prepared_dir=tiny_data["prepared"], device="cpu", model=_model(0, tiny_data["prepared"]))
    assert result["images"] == 6 and result["texts"] == 6 * 2
    assert result["max_abs_recall_diff"] == 0.0 and result["rerank"] == result["exhaustive"]
    assert result["exhaustive_itm_s"] > 0 and result["itm_pairs_exhaustive"] == 72


def test_evaluate_cli_help() -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--params" in result.output
