"""Recall statistics: the exact chance level against enumeration, the paired cluster
bootstrap against recall recomputed from resampled score matrices by the evaluation code,
the bootstrap over binding groups (clusters of images) against a direct loop and an exact
enumeration, and the across-seed Student t interval against known quantiles."""
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
    canonical_clusters,
    chance_recall,
    draw_resamples,
    excludes_zero,
    paired_bootstrap,
    recalls_from_ranks,
    resampled_differences,
    seed_interval,
    t_quantile,
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


# ------------------------------------------------------------------ clusters (binding groups)
# 6 images with 1 or 2 captions; labels as run_evaluate might not write them (any integers):
# by first appearance the clusters are {0, 1}, {2}, {3, 4}, {5}
CL_TXT2IMG = np.repeat(np.arange(6), [1, 2, 1, 1, 2, 1])
CL_LABELS = np.array([4, 4, 1, 7, 7, 0])
CL_MEMBERS = [[0, 1], [2], [3, 4], [5]]
CL_A = Ranks(np.array([0, 0, 12, 3, 0, 0]), np.array([0, 0, 1, 2, 0, 0, 9, 0]))
CL_B = Ranks(np.array([2, 0, 0, 0, 6, 1]), np.array([0, 5, 0, 0, 3, 0, 0, 1]))


def _drawn_recall(ranks: Ranks, txt2img: np.ndarray, members, drawn_clusters) -> dict[str, float]:
    """Recall on the queries of the drawn clusters, written out: each drawn cluster adds all of
    its images (text retrieval queries) and all of their captions (image retrieval queries)."""
    images = [i for c in drawn_clusters for i in members[c]]
    captions = [t for i in images for t in np.flatnonzero(txt2img == i)]
    return recalls_from_ranks(ranks.tr[images], ranks.ir[captions])


def test_canonical_clusters_number_by_first_appearance() -> None:
    assert canonical_clusters(CL_LABELS, 6).tolist() == [0, 0, 1, 2, 2, 3]
    assert canonical_clusters(np.arange(6) * 10, 6).tolist() == list(range(6))
    assert canonical_clusters(None, 6) is None
    with pytest.raises(DataError, match=r"clusters: expected one integer cluster id per image \(6\)"):
        canonical_clusters(np.zeros(5, dtype=int), 6)
    with pytest.raises(DataError, match="clusters"):
        paired_bootstrap(CL_A, CL_B, CL_TXT2IMG, n_samples=10, clusters=np.zeros(6))  # floats


def test_cluster_bootstrap_equals_a_direct_loop_over_drawn_clusters() -> None:
    """Every resample (the seeded stream of cluster draws) recomputed with a plain Python loop."""
    n_samples, seed = 600, 11  # more than one chunk of the stream
    result = paired_bootstrap(CL_A, CL_B, CL_TXT2IMG, n_samples=n_samples, seed=seed, clusters=CL_LABELS)
    chance = bootstrap_vs_chance(CL_A, CL_TXT2IMG, n_samples=n_samples, seed=seed, clusters=CL_LABELS)
    exact_chance = _chance_per_query(CL_TXT2IMG)
    diffs = {key: [] for key in BOOTSTRAP_METRICS}
    vs_chance = []
    for drawn in np.concatenate(list(draw_resamples(len(CL_MEMBERS), n_samples, seed))):
        ra = _drawn_recall(CL_A, CL_TXT2IMG, CL_MEMBERS, drawn)
        rb = _drawn_recall(CL_B, CL_TXT2IMG, CL_MEMBERS, drawn)
        for key in BOOTSTRAP_METRICS:
            diffs[key].append(ra[key] - rb[key])
        images = [i for c in drawn for i in CL_MEMBERS[c]]
        vs_chance.append(ra["r_mean"] - exact_chance(images))
    for key in BOOTSTRAP_METRICS:
        lo, hi = np.percentile(diffs[key], [2.5, 97.5])
        assert (result[key]["lo"], result[key]["hi"]) == pytest.approx((lo, hi), abs=1e-9), key
    lo, hi = np.percentile(vs_chance, [2.5, 97.5])
    assert (chance["r_mean"]["lo"], chance["r_mean"]["hi"]) == pytest.approx((lo, hi), abs=1e-9)
    # the point estimate is the full test set, whatever the unit
    full = recalls_from_ranks(*CL_A)["r_mean"] - recalls_from_ranks(*CL_B)["r_mean"]
    assert result["r_mean"]["diff"] == pytest.approx(full)
    # drawing clusters is not drawing images: the image-level interval differs here
    assert paired_bootstrap(CL_A, CL_B, CL_TXT2IMG, n_samples=n_samples, seed=seed)["r_mean"] != result["r_mean"]


def _chance_per_query(txt2img: np.ndarray):
    """R mean of a random ranking on the queries of the drawn images (expected hit per query)."""
    n, m = txt2img.max() + 1, len(txt2img)
    g = np.bincount(txt2img)

    def tr_hit(gi: int, k: int) -> float:  # 1 - C(m - g, k) / C(m, k), with math.comb
        from math import comb
        return 1.0 - comb(m - gi, k) / comb(m, k) if k <= m else 1.0

    def r_mean(images) -> float:
        tr = [100 * np.mean([tr_hit(g[i], k) for i in images]) for k in (1, 5, 10)]
        ir = [100 * min(k, n) / n for k in (1, 5, 10)]  # the same for every caption
        return (np.mean(tr) + np.mean(ir)) / 2

    return r_mean


def test_cluster_bootstrap_interval_matches_exact_enumeration() -> None:
    """4 clusters: all 4**4 equally likely resamples enumerated. The 2.5% and 97.5% quantiles of the
    exact distribution of the R mean difference are what 20000 bootstrap resamples give."""
    values = np.array([_drawn_recall(CL_A, CL_TXT2IMG, CL_MEMBERS, d)["r_mean"]
                       - _drawn_recall(CL_B, CL_TXT2IMG, CL_MEMBERS, d)["r_mean"]
                       for d in itertools.product(range(4), repeat=4)])
    support, counts = np.unique(np.round(values, 9), return_counts=True)
    cdf = np.cumsum(counts) / len(values)
    lo_pos, hi_pos = int(np.searchsorted(cdf, 0.025)), int(np.searchsorted(cdf, 0.975))
    # both levels fall well inside a step of the exact CDF (else sampling could move the quantile)
    assert cdf[lo_pos - 1] + 0.005 < 0.025 < cdf[lo_pos] - 0.005
    assert cdf[hi_pos - 1] + 0.005 < 0.975 < cdf[hi_pos] - 0.005
    got = paired_bootstrap(CL_A, CL_B, CL_TXT2IMG, n_samples=20000, seed=3, clusters=CL_LABELS)["r_mean"]
    assert got["lo"] == pytest.approx(support[lo_pos], abs=1e-6)
    assert got["hi"] == pytest.approx(support[hi_pos], abs=1e-6)
    assert got["diff"] == pytest.approx(values[np.ravel_multi_index((0, 1, 2, 3), (4,) * 4)])  # the full set


def test_one_cluster_per_image_is_the_image_bootstrap_bit_for_bit() -> None:
    scores, txt2img = _toy_pair()
    img2txt = img2txt_from_txt2img(txt2img, 12)
    a, b = (Ranks(*retrieval_ranks(*scores[m], txt2img, img2txt)) for m in "ab")
    plain = paired_bootstrap(a, b, txt2img, n_samples=500, seed=1)
    assert paired_bootstrap(a, b, txt2img, n_samples=500, seed=1, clusters=None) == plain
    assert paired_bootstrap(a, b, txt2img, n_samples=500, seed=1, clusters=np.arange(12) + 100) == plain
    assert bootstrap_vs_chance(a, txt2img, n_samples=500, seed=1, clusters=np.arange(12)) == \
        bootstrap_vs_chance(a, txt2img, n_samples=500, seed=1)


def test_clustered_interval_is_wider_when_members_are_perfectly_correlated() -> None:
    """30 clusters of 3 images whose members always share their outcome: the data hold 30
    independent units, not 90, and the cluster bootstrap's interval is about sqrt(3) wider."""
    rng = np.random.default_rng(8)
    n_clusters, size = 30, 3
    clusters = np.repeat(np.arange(n_clusters), size)
    txt2img = np.repeat(np.arange(n_clusters * size), 2)
    ratios = []
    for rep in range(5):
        hit_a, hit_b = rng.random(n_clusters) < 0.6, rng.random(n_clusters) < 0.4
        a = Ranks(np.where(hit_a[clusters], 0, 20), np.where(np.repeat(hit_a[clusters], 2), 0, 20))
        b = Ranks(np.where(hit_b[clusters], 0, 20), np.where(np.repeat(hit_b[clusters], 2), 0, 20))
        by_image = paired_bootstrap(a, b, txt2img, n_samples=1000, seed=rep)["r_mean"]
        by_cluster = paired_bootstrap(a, b, txt2img, n_samples=1000, seed=rep, clusters=clusters)["r_mean"]
        assert by_cluster["diff"] == by_image["diff"]
        ratios.append((by_cluster["hi"] - by_cluster["lo"]) / (by_image["hi"] - by_image["lo"]))
    assert min(ratios) > 1.3 and 1.45 < np.mean(ratios) < 2.0, ratios  # sqrt(3) = 1.73


# ------------------------------------------------------------------ across seeds
def test_t_quantiles_match_the_table() -> None:
    known = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}  # t(0.975, dof)
    for dof, value in known.items():
        assert t_quantile(0.975, dof) == pytest.approx(value, abs=5e-4), dof
    with pytest.raises(DataError, match="dof"):
        t_quantile(0.975, 0)


def test_seed_interval_is_mean_plus_minus_t_times_standard_error() -> None:
    ci = seed_interval([1.0, 2.0, 3.0])  # mean 2, std 1, n 3
    half = 4.302653 / np.sqrt(3)
    assert (ci["diff"], ci["std"], ci["n"], ci["dof"]) == (2.0, 1.0, 3, 2)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2 - half, 2 + half), abs=1e-5)
    assert not excludes_zero(ci) and excludes_zero(seed_interval([1.5, 2.0, 2.5]))  # half-width 2.48, 1.24
    wide = seed_interval([4.0, 1.0, 2.5], level=0.99)
    assert wide["hi"] - wide["lo"] > ci["hi"] - ci["lo"]
    with pytest.raises(DataError, match=">= 2"):
        seed_interval([1.0])
