"""Statistics of retrieval recall: exact chance level and paired bootstrap intervals.

Pure numpy; everything works on the per-query ranks that the evaluate stage writes to
``reports/evaluate/ranks.npz`` (0-based; ``R@K = 100 * mean(rank < K)``):

- ``tr`` ranks, one per image: the rank of the image's best gold caption among all texts;
- ``ir`` ranks, one per caption: the rank of the caption's gold image among all images;
- ``txt2img``, one per caption: the index of its image.

The bootstrap resamples the split's *independent units* with replacement (a cluster
bootstrap). By default the unit is the image: the captions of one image share it and are
not independent, so they enter with it. Given per-image ``clusters`` (the ``clusters``
array of ranks.npz: images that are each other's distractors, e.g. the synthetic set's
binding groups, share an id), the unit is the cluster: a resample draws as many clusters
as the split has, and every image of a drawn cluster enters, with its captions. A
resample keeps the candidate gallery fixed and only changes which queries are averaged:
text retrieval averages the ranks of the drawn images, image retrieval the ranks of every
caption of the drawn images (an image drawn twice counts its captions twice). Two models
are compared on the *same* resamples (a paired bootstrap), so the noise they share cancels.

All of it is vectorised: a resample is a row of image counts, and the recall sums of
every resample are one matrix product of those counts with a per-image table.

Across seeds, :func:`seed_interval` gives the Student t interval of a mean of paired
per-seed differences.
"""
from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from dmp_core.errors import DataError

RECALL_KS = (1, 5, 10)
# the metrics the bootstrap reports (differences in percentage points)
BOOTSTRAP_METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean")
_CHUNK = 256  # resamples per matrix product (bounds memory on COCO: 256 x 5000 counts)


class Ranks(NamedTuple):
    """Per-query 0-based ranks of one model and scorer."""

    tr: np.ndarray  # [N images]: rank of the best gold caption of each image
    ir: np.ndarray  # [M texts]: rank of the gold image of each caption


# ------------------------------------------------------------------ recall
def _recall_dict(tr: Mapping[int, float], ir: Mapping[int, float], ks: Sequence[int]) -> dict[str, float]:
    """``tr_r{k}``, ``ir_r{k}``, ``tr_mean``, ``ir_mean`` and ``r_mean`` (as retrieval_metrics computes them)."""
    out = {f"tr_r{k}": tr[k] for k in ks}
    out.update({f"ir_r{k}": ir[k] for k in ks})
    out["tr_mean"] = float(np.mean([tr[k] for k in ks]))
    out["ir_mean"] = float(np.mean([ir[k] for k in ks]))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def recalls_from_ranks(tr_ranks: np.ndarray, ir_ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """TR/IR R@K in percent from per-query ranks, and ``tr_mean``, ``ir_mean``, ``r_mean`` (mean of the six)."""
    tr_ranks, ir_ranks = np.asarray(tr_ranks), np.asarray(ir_ranks)
    if tr_ranks.size == 0 or ir_ranks.size == 0:
        raise DataError("recalls_from_ranks: empty ranks")
    tr = {k: 100.0 * float(np.mean(tr_ranks < k)) for k in ks}
    ir = {k: 100.0 * float(np.mean(ir_ranks < k)) for k in ks}
    return _recall_dict(tr, ir, ks)


def _captions_per_image(txt2img: np.ndarray, n_images: int | None = None) -> np.ndarray:
    """Number of captions of every image; DataError if an image has none or an index is out of range."""
    txt2img = np.asarray(txt2img)
    if txt2img.ndim != 1 or txt2img.size == 0 or not np.issubdtype(txt2img.dtype, np.integer):
        raise DataError(f"txt2img: expected a non-empty 1-D integer array, got {txt2img.dtype} {txt2img.shape}")
    n = int(txt2img.max()) + 1 if n_images is None else int(n_images)
    if txt2img.min() < 0 or txt2img.max() >= n:
        raise DataError(f"txt2img: image indices must lie in [0, {n})")
    counts = np.bincount(txt2img, minlength=n)
    if (counts == 0).any():
        raise DataError(f"txt2img: image {int(np.flatnonzero(counts == 0)[0])} has no caption")
    return counts


def chance_recall(txt2img: np.ndarray, ks: Sequence[int] = RECALL_KS, n_images: int | None = None) -> dict[str, float]:
    """The exact expected recall (percent) of a uniformly random ranking on this split.

    Image retrieval: the gold image is at a uniformly random position among N images,
    so R@K = min(K, N) / N. Text retrieval: an image with g gold captions among M texts
    has none of them in the top K with probability C(M-g, K) / C(M, K), so
    R@K = 1 - C(M-g, K) / C(M, K), averaged over images. ``r_mean`` is the mean of the
    six, as for a model.
    """
    g = _captions_per_image(txt2img, n_images)
    n, m = len(g), int(g.sum())
    tr, ir = {}, {}
    for k in ks:
        tr[k] = 100.0 * float(np.mean(_tr_hit_probability(g, m, k)))
        ir[k] = 100.0 * min(k, n) / n
    return _recall_dict(tr, ir, ks)


def _tr_hit_probability(g: np.ndarray, m: int, k: int) -> np.ndarray:
    """P(at least one of g gold captions among the top k of m shuffled texts), per image.

    C(M-g, K) / C(M, K) = prod_{j<g} (M-K-j) / (M-j): a product of g factors (no huge
    binomials); a factor <= 0 means the top K cannot avoid every gold caption.
    """
    g = np.asarray(g)
    out = np.empty(len(g), dtype=np.float64)
    for value in np.unique(g):
        j = np.arange(int(value))
        miss = float(np.prod(np.clip((m - k - j) / (m - j), 0.0, None)))
        out[g == value] = 1.0 - miss
    return out


# ------------------------------------------------------------------ resampling
def _check_ranks(ranks: Ranks | Sequence[np.ndarray], txt2img: np.ndarray) -> tuple[Ranks, np.ndarray]:
    tr, ir = (np.asarray(a) for a in ranks)
    g = _captions_per_image(txt2img, n_images=len(tr))
    if ir.shape != (len(txt2img),):
        raise DataError(f"ir ranks have shape {ir.shape}, expected ({len(txt2img)},) (one per caption)")
    return Ranks(tr, ir), g


def _image_table(tr_values: np.ndarray, ir_values: np.ndarray, txt2img: np.ndarray, n_images: int) -> np.ndarray:
    """Per image: its TR value for each K, then the sum of its captions' IR values for each K."""
    txt2img = np.asarray(txt2img)
    ir_sums = np.stack([np.bincount(txt2img, weights=ir_values[:, j], minlength=n_images)
                        for j in range(ir_values.shape[1])], axis=1)
    return np.hstack([tr_values, ir_sums]).astype(np.float64)


def _hits_table(ranks: Ranks, txt2img: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """The per-image table of a model: hits (rank < K) of the image's TR query and of its IR queries."""
    kk = np.asarray(ks)
    tr_hits = (ranks.tr[:, None] < kk[None, :]).astype(np.float64)
    ir_hits = (ranks.ir[:, None] < kk[None, :]).astype(np.float64)
    return _image_table(tr_hits, ir_hits, txt2img, len(ranks.tr))


def _chance_table(txt2img: np.ndarray, n_images: int, ks: Sequence[int]) -> np.ndarray:
    """The per-image table of a random ranking: expected hits instead of hits."""
    g = _captions_per_image(txt2img, n_images)
    m = int(g.sum())
    tr = np.stack([_tr_hit_probability(g, m, k) for k in ks], axis=1)
    ir = np.tile(np.array([min(k, n_images) / n_images for k in ks]), (m, 1))
    return _image_table(tr, ir, txt2img, n_images)


def _resample_counts(image_indices: np.ndarray, n_images: int) -> np.ndarray:
    """[S, B] drawn image indices -> [S, N] how often each image was drawn in each resample."""
    s = image_indices.shape[0]
    flat = (image_indices + (np.arange(s) * n_images)[:, None]).ravel()
    return np.bincount(flat, minlength=s * n_images).reshape(s, n_images).astype(np.float64)


def _recalls_from_table(table: np.ndarray, g: np.ndarray, counts: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Recall of every resample (rows of ``counts``) from a per-image table; same arithmetic as recalls_from_ranks."""
    sums = counts @ table  # [S, 2K]: exact for hit counts (integers far below 2**53)
    n_queries = counts.sum(axis=1)  # drawn images (= text-retrieval queries)
    n_captions = counts @ g.astype(np.float64)  # their captions (= image-retrieval queries)
    nk = len(ks)
    tr = {k: 100.0 * (sums[:, j] / n_queries) for j, k in enumerate(ks)}
    ir = {k: 100.0 * (sums[:, nk + j] / n_captions) for j, k in enumerate(ks)}
    out = {f"tr_r{k}": tr[k] for k in ks}
    out.update({f"ir_r{k}": ir[k] for k in ks})
    out["tr_mean"] = np.mean(np.stack([tr[k] for k in ks]), axis=0)
    out["ir_mean"] = np.mean(np.stack([ir[k] for k in ks]), axis=0)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def canonical_clusters(clusters: Optional[np.ndarray], n_images: int) -> Optional[np.ndarray]:
    """Per-image cluster ids relabelled 0..C-1 in order of first appearance (None stays None).

    Any integer labels work; equal labels are one cluster. Images that each have their own
    label (one cluster per image, in image order) become ``arange(N)``, for which the
    cluster bootstrap draws exactly the resamples of the image bootstrap.
    """
    if clusters is None:
        return None
    c = np.asarray(clusters)
    if c.shape != (n_images,) or not np.issubdtype(c.dtype, np.integer):
        raise DataError(f"clusters: expected one integer cluster id per image ({n_images}), got {c.dtype} {c.shape}")
    _, first, inverse = np.unique(c, return_index=True, return_inverse=True)
    relabel = np.empty(len(first), dtype=np.int64)
    relabel[np.argsort(first, kind="stable")] = np.arange(len(first))
    return relabel[inverse.reshape(-1)]


def _check_indices(image_indices: np.ndarray, n_images: int) -> np.ndarray:
    idx = np.asarray(image_indices)
    if idx.ndim == 1:
        idx = idx[None, :]
    if idx.ndim != 2 or idx.shape[1] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"image_indices: expected an integer array [samples, drawn images], got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n_images:
        raise DataError(f"image_indices: indices must lie in [0, {n_images})")
    return idx


def resampled_recalls(ranks: Ranks | Sequence[np.ndarray], txt2img: np.ndarray, image_indices: np.ndarray,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, np.ndarray]:
    """Recall of one model on explicit resamples: ``image_indices`` [S, B] lists the drawn images of each.

    Returns metric -> array [S] (the keys of :func:`recalls_from_ranks`).
    """
    ranks, g = _check_ranks(ranks, txt2img)
    idx = _check_indices(image_indices, len(g))
    return _recalls_from_table(_hits_table(ranks, txt2img, ks), g, _resample_counts(idx, len(g)), ks)


def resampled_differences(ranks_a: Ranks | Sequence[np.ndarray], ranks_b: Ranks | Sequence[np.ndarray],
                          txt2img: np.ndarray, image_indices: np.ndarray,
                          ks: Sequence[int] = RECALL_KS) -> dict[str, np.ndarray]:
    """Recall of A minus recall of B on the same explicit resamples: metric -> array [S]."""
    a = resampled_recalls(ranks_a, txt2img, image_indices, ks)
    b = resampled_recalls(ranks_b, txt2img, image_indices, ks)
    return {key: a[key] - b[key] for key in a}


def draw_resamples(n_images: int, n_samples: int, seed: int, chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    """Chunks of resamples ([<=chunk, n_images] image indices drawn with replacement), from one seeded stream."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_samples:
        size = min(chunk, n_samples - done)
        yield rng.integers(0, n_images, size=(size, n_images))
        done += size


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _bootstrap(table_a: np.ndarray, table_b: np.ndarray, g: np.ndarray, n_samples: int, seed: int,
               ks: Sequence[int], clusters: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per-resample differences of two per-image tables over ``n_samples`` seeded resamples.

    ``clusters`` (canonical, 0..C-1 per image): C clusters are drawn per resample and an
    image counts as often as its cluster was drawn; None: the images themselves are drawn.
    """
    if n_samples < 1:
        raise DataError(f"bootstrap: n_samples must be >= 1, got {n_samples}")
    n_units = len(g) if clusters is None else int(clusters.max()) + 1
    parts: dict[str, list[np.ndarray]] = {}
    for idx in draw_resamples(n_units, n_samples, seed):
        counts = _resample_counts(idx, n_units)
        if clusters is not None:
            counts = counts[:, clusters]  # [S, C] cluster draws -> [S, N] image counts
        a = _recalls_from_table(table_a, g, counts, ks)
        b = _recalls_from_table(table_b, g, counts, ks)
        for key in a:
            parts.setdefault(key, []).append(a[key] - b[key])
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


def paired_bootstrap(ranks_a: Ranks | Sequence[np.ndarray], ranks_b: Ranks | Sequence[np.ndarray],
                     txt2img: np.ndarray, n_samples: int = 2000, seed: int = 0, level: float = 0.95,
                     ks: Sequence[int] = RECALL_KS,
                     clusters: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
    """Paired cluster bootstrap of recall(A) - recall(B) on one test split.

    Returns metric -> ``{"diff", "lo", "hi"}`` for tr_r1..ir_r10, tr_mean, ir_mean and
    r_mean: ``diff`` is the difference on the full test set, ``lo``/``hi`` the
    percentile interval at ``level`` over ``n_samples`` resamples (the same resamples
    for A and B; the same seed gives the same resamples). The resampled unit is the
    image, or with ``clusters`` (one integer id per image) the cluster: all images of a
    drawn cluster, with their captions, enter together.
    """
    ranks_a, g = _check_ranks(ranks_a, txt2img)
    ranks_b, _ = _check_ranks(ranks_b, txt2img)
    if len(ranks_a.tr) != len(ranks_b.tr):
        raise DataError(f"paired_bootstrap: the models ranked {len(ranks_a.tr)} and {len(ranks_b.tr)} images "
                        "(not the same split)")
    clusters = canonical_clusters(clusters, len(g))
    samples = _bootstrap(_hits_table(ranks_a, txt2img, ks), _hits_table(ranks_b, txt2img, ks), g, n_samples, seed, ks,
                         clusters)
    full_a, full_b = recalls_from_ranks(*ranks_a, ks=ks), recalls_from_ranks(*ranks_b, ks=ks)
    out = {}
    for key, values in samples.items():
        lo, hi = _interval(values, level)
        out[key] = {"diff": full_a[key] - full_b[key], "lo": lo, "hi": hi}
    return out


def bootstrap_vs_chance(ranks: Ranks | Sequence[np.ndarray], txt2img: np.ndarray, n_samples: int = 2000,
                        seed: int = 0, level: float = 0.95, ks: Sequence[int] = RECALL_KS,
                        clusters: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
    """Bootstrap of recall(model) - chance recall, per metric: ``{"value", "chance", "diff", "lo", "hi"}``.

    Chance enters each resample as the expected hit of a random ranking for each drawn
    query (so a resample with many-caption images gets their higher TR chance). The
    resampled unit is as in :func:`paired_bootstrap` (images, or ``clusters``).
    """
    ranks, g = _check_ranks(ranks, txt2img)
    clusters = canonical_clusters(clusters, len(g))
    table_chance = _chance_table(txt2img, len(g), ks)
    samples = _bootstrap(_hits_table(ranks, txt2img, ks), table_chance, g, n_samples, seed, ks, clusters)
    value, chance = recalls_from_ranks(*ranks, ks=ks), chance_recall(txt2img, ks, n_images=len(g))
    out = {}
    for key, values in samples.items():
        lo, hi = _interval(values, level)
        out[key] = {"value": value[key], "chance": chance[key], "diff": value[key] - chance[key], "lo": lo, "hi": hi}
    return out


def excludes_zero(interval: Mapping[str, float]) -> bool:
    """Whether a ``{"lo", "hi"}`` interval lies entirely on one side of 0."""
    return interval["lo"] > 0 or interval["hi"] < 0


# ------------------------------------------------------------------ across seeds
def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t with ``dof`` degrees of freedom (scipy.stats.t.ppf)."""
    if dof < 1:
        raise DataError(f"t_quantile: dof must be >= 1, got {dof}")
    from scipy.stats import t  # scipy comes with scikit-image; imported here, only the report needs it

    return float(t.ppf(q, dof))


def seed_interval(differences: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Student t interval of the mean of paired per-seed differences (A - B of each seed both ran).

    Returns ``{"diff": mean, "std": sample std (ddof 1), "lo", "hi", "n", "dof"}`` with
    ``lo, hi = mean -/+ t(1 - (1 - level) / 2, n - 1) * std / sqrt(n)``; needs n >= 2.
    The seeds are the independent units here: the interval is about the recipe (training
    randomness included), on this one test set.
    """
    d = np.asarray([float(v) for v in differences], dtype=np.float64)
    if d.ndim != 1 or len(d) < 2 or not np.isfinite(d).all():
        raise DataError(f"seed_interval: needs >= 2 finite per-seed differences, got {list(differences)}")
    n = len(d)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(1.0 - (1.0 - level) / 2, n - 1) * std / float(np.sqrt(n))
    return {"diff": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n, "dof": n - 1}
