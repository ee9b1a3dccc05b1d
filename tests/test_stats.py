"""Recall statistics: the exact chance level against enumeration, and the paired cluster
bootstrap against recall recomputed from resampled score matrices by the evaluation code."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from dmp_core.errors import DataError
from dmp_core.evaluation.retrieval import img2txt_from_txt2img, retrieval_metrics, retrieval_ranks
from dmp_core.stats import (
    BOOTSTRAP_METRICS,
    Ranks,
    bootstrap_vs_chance,
    chance_recall,
    draw_resamples,
    excludes_zero,
    paired_bootstrap,
    recalls_from_ranks,
    resampled_differences,
)

RECALL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


# ------------------------------------------------------------------ chance
def test_chance_recall_equals_enumeration_of_every_ranking() -> None:
    """3 images with 2, 1 and 3 captions: average the hits over all 6! text and 3! image orders."""
    txt2img = np.array([0, 0, 1, 2, 2, 2])
    ks = (1, 2, 5, 10)
    n, m = 3, len(txt2img)
    tr_hits = {k: [] for k in ks}
    for order in itertools.permutations(range(m)):  # order[p] = the text at position p
        position = np.argsort(order)
        for i in range(n):
            best = position[txt2img == i].min()
            for k in ks:
                tr_hits[k].append(best < k)
    ir_hits = {k: [] for k in ks}
    for order in itertools.permutations(range(n)):
        position = np.argsort(order)
        for t in range(m):
            for k in ks:
                ir_hits[k].append(position[txt2img[t]] < k)
    chance = chance_recall(txt2img, ks=ks)
    for k in ks:
        assert chance[f"tr_r{k}"] == pytest.approx(100 * np.mean(tr_hits[k]), abs=1e-10), k
        assert chance[f"ir_r{k}"] == pytest.approx(100 * np.mean(ir_hits[k]), abs=1e-10), k
    assert chance["tr_r10"] == chance["ir_r5"] == 100.0  # K beyond the pool: always retrieved
    six = [chance[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 2, 5, 10)]
    assert chance["r_mean"] == pytest.approx(np.mean(six))


def test_chance_recall_matches_random_scores_on_a_larger_split() -> None:
    """Monte Carlo: random score matrices ranked by the evaluation code land on the exact chance level."""
    rng = np.random.default_rng(0)
    txt2img = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    img2txt = img2txt_from_txt2img(txt2img, 40)
    runs = [retrieval_metrics(s, rng.random((len(txt2img), 40)), txt2img, img2txt)
            for s in (rng.random((40, len(txt2img))) for _ in range(400))]
    exact = chance_recall(txt2img)
    for key in RECALL_KEYS:
        estimate = np.mean([r[key] for r in runs])
        spread = np.std([r[key] for r in runs]) / np.sqrt(len(runs))
        assert abs(estimate - exact[key]) < 4 * spread + 1e-9, (key, estimate, exact[key])


def test_chance_recall_rejects_an_image_without_captions() -> None:
    with pytest.raises(DataError, match="image 1 has no caption"):
        chance_recall(np.array([0, 0, 2]))


# ------------------------------------------------------------------ recall from ranks
def test_recalls_from_ranks_equal_retrieval_metrics() -> None:
    rng = np.random.default_rng(1)
    txt2img = np.repeat(np.arange(12), 3)
    i2t, t2i = rng.standard_normal((12, 36)), rng.standard_normal((36, 12))
    img2txt = img2txt_from_txt2img(txt2img, 12)
    want = retrieval_metrics(i2t, t2i, txt2img, img2txt)
    got = recalls_from_ranks(*retrieval_ranks(i2t, t2i, txt2img, img2txt))
    for key in (*RECALL_KEYS, "tr_mean", "ir_mean", "r_mean"):
        assert got[key] == want[key], key


# ------------------------------------------------------------------ the bootstrap
def _toy_pair(seed: int = 2):
    """Two correlated models' score matrices on 12 images with 2 or 3 captions each."""
    rng = np.random.default_rng(seed)
    txt2img = np.repeat(np.arange(12), [2, 3, 2, 2, 3, 3, 2, 2, 3, 2, 3, 2])
    gold = (txt2img[None, :] == np.arange(12)[:, None]).astype(float)
    shared = rng.standard_normal(gold.shape)
    scores = {}
    for name, signal in (("a", 1.5), ("b", 0.7)):
        i2t = signal * gold + shared + 0.8 * rng.standard_normal(gold.shape)
        t2i = (signal * gold + shared).T + 0.8 * rng.standard_normal(gold.T.shape)
        scores[name] = (i2t, t2i)
    return scores, txt2img


def _reference_recall(i2t: np.ndarray, t2i: np.ndarray, txt2img: np.ndarray, drawn: np.ndarray) -> dict[str, float]:
    """Recall on the resampled queries, recomputed from the resampled score matrices by retrieval_metrics.

    Text retrieval: the query rows of the drawn images (a row per draw) against every
    caption. Image retrieval: the rows of every caption of the drawn images (with
    multiplicity) against every image. retrieval_metrics scores both directions at once
    and wants matching shapes, so each direction is one call whose other half is a
    placeholder that is ignored.
    """
    n, m = i2t.shape
    img2txt = img2txt_from_txt2img(txt2img, n)
    tr = retrieval_metrics(i2t[drawn], np.zeros((m, len(drawn))), np.zeros(m, dtype=np.int64),
                           [img2txt[i] for i in drawn])
    captions = np.concatenate([img2txt[i] for i in drawn])
    ir = retrieval_metrics(np.zeros((n, len(captions))), t2i[captions], txt2img[captions], [[0]] * n)
    out = {key: tr[key] for key in ("tr_r1", "tr_r5", "tr_r10", "tr_mean")}
    out.update({key: ir[key] for key in ("ir_r1", "ir_r5", "ir_r10", "ir_mean")})
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def test_bootstrap_differences_equal_recall_recomputed_from_resampled_scores() -> None:
    scores, txt2img = _toy_pair()
    img2txt = img2txt_from_txt2img(txt2img, 12)
    ranks = {name: Ranks(*retrieval_ranks(i2t, t2i, txt2img, img2txt)) for name, (i2t, t2i) in scores.items()}
    rng = np.random.default_rng(3)
    resamples = np.stack([np.arange(12), np.zeros(12, dtype=int), *rng.integers(0, 12, (6, 12))])
    got = resampled_differences(ranks["a"], ranks["b"], txt2img, resamples)
    for s, drawn in enumerate(resamples):
        ref_a = _reference_recall(*scores["a"], txt2img, drawn)
        ref_b = _reference_recall(*scores["b"], txt2img, drawn)
        for key in BOOTSTRAP_METRICS:
            assert got[key][s] == ref_a[key] - ref_b[key], (s, key)
    # the identity resample is the full test set
    full = {m: retrieval_metrics(*scores[m], txt2img, img2txt) for m in "ab"}
    assert got["r_mean"][0] == full["a"]["r_mean"] - full["b"]["r_mean"]


def test_paired_bootstrap_uses_the_resamples_it_draws() -> None:
    scores, txt2img = _toy_pair()
    img2txt = img2txt_from_txt2img(txt2img, 12)
    a, b = (Ranks(*retrieval_ranks(*scores[m], txt2img, img2txt)) for m in "ab")
    result = paired_bootstrap(a, b, txt2img, n_samples=300, seed=7)
    drawn = np.concatenate(list(draw_resamples(12, 300, seed=7)))
    per_sample = resampled_differences(a, b, txt2img, drawn)
    for key in BOOTSTRAP_METRICS:
        lo, hi = np.percentile(per_sample[key], [2.5, 97.5])
        assert (result[key]["lo"], result[key]["hi"]) == pytest.approx((lo, hi)), key
    assert result["r_mean"]["diff"] == pytest.approx(recalls_from_ranks(*a)["r_mean"] - recalls_from_ranks(*b)["r_mean"])
    assert paired_bootstrap(a, b, txt2img, n_samples=300, seed=7) == result  # fixed seed: same interval


def test_identical_models_give_a_zero_interval_and_a_perfect_model_beats_chance() -> None:
    rng = np.random.default_rng(4)
    txt2img = np.repeat(np.arange(50), 5)
    ranks = Ranks(rng.integers(0, 250, 50), rng.integers(0, 50, 250))
    same = paired_bootstrap(ranks, ranks, txt2img, n_samples=200, seed=0)
    assert all((v["diff"], v["lo"], v["hi"]) == (0.0, 0.0, 0.0) for v in same.values())
    assert not excludes_zero(same["r_mean"])

    perfect = Ranks(np.zeros(50, dtype=int), np.zeros(250, dtype=int))
    vs = bootstrap_vs_chance(perfect, txt2img, n_samples=200, seed=0)
    chance = chance_recall(txt2img)
    assert vs["r_mean"]["value"] == 100.0 and vs["r_mean"]["chance"] == pytest.approx(chance["r_mean"])
    # every image has 5 captions, so chance is the same in every resample: a point interval
    assert excludes_zero(vs["r_mean"]) and vs["r_mean"]["lo"] == pytest.approx(100 - chance["r_mean"])
    # a model at chance: its interval covers 0
    img2txt = img2txt_from_txt2img(txt2img, 50)
    random = Ranks(*retrieval_ranks(rng.random((50, 250)), rng.random((250, 50)), txt2img, img2txt))
    assert not excludes_zero(bootstrap_vs_chance(random, txt2img, n_samples=500, seed=0)["r_mean"])


def test_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    """Simulated test sets with a known difference in TR R@1 (50% vs 40%): coverage near 0.95,
    and the interval narrows as the test set grows."""
    rng = np.random.default_rng(5)
    covered, widths = [], {}
    for n in (60, 600):
        txt2img = np.repeat(np.arange(n), 2)
        for rep in range(150 if n == 60 else 20):
            a = Ranks(np.where(rng.random(n) < 0.5, 0, 5), rng.integers(0, n, 2 * n))
            b = Ranks(np.where(rng.random(n) < 0.4, 0, 5), rng.integers(0, n, 2 * n))
            interval = paired_bootstrap(a, b, txt2img, n_samples=400, seed=rep)["tr_r1"]
            widths.setdefault(n, []).append(interval["hi"] - interval["lo"])
            if n == 60:
                covered.append(interval["lo"] <= 10.0 <= interval["hi"])
    assert 0.88 <= np.mean(covered) <= 0.99
    assert np.mean(widths[600]) < 0.45 * np.mean(widths[60])  # ~ 1/sqrt(10)


def test_bootstrap_is_fast_enough_for_coco() -> None:
    rng = np.random.default_rng(6)
    txt2img = np.repeat(np.arange(500), 5)
    a, b = (Ranks(rng.integers(0, 2500, 500), rng.integers(0, 500, 2500)) for _ in range(2))
    start = time.perf_counter()
    paired_bootstrap(a, b, txt2img, n_samples=2000, seed=0)
    assert time.perf_counter() - start < 1.0


def test_bad_inputs_name_what_is_wrong() -> None:
    txt2img = np.repeat(np.arange(4), 2)
    good = Ranks(np.zeros(4, dtype=int), np.zeros(8, dtype=int))
    with pytest.raises(DataError, match="ir ranks have shape"):
        paired_bootstrap(good, Ranks(np.zeros(4, dtype=int), np.zeros(7, dtype=int)), txt2img, n_samples=10)
    with pytest.raises(DataError, match="image_indices"):
        resampled_differences(good, good, txt2img, np.array([[0, 9]]))
