"""The research report: ``reports/results.md`` and ``reports/figures/*.png``.

Everything arrives as plain data, so this package knows nothing about DVC, git or MLflow
(``orchestration/runs.py`` gathers it):

- :class:`Run`: one finished run of the pipeline (the workspace, the HEAD commit, a DVC
  experiment or an exported run folder) with its resolved params and the files its stages wrote:
  ``reports/evaluate/details.json`` (every recall, diagnostics, split), ``ranks.npz``
  (per-query ranks, for the bootstrap and the chance level), ``metrics.json`` (used only
  when details.json is missing) and ``reports/<stage>/metrics.json`` (steps, epochs).
- the *baseline*: the resolved params of the HEAD commit. Every row is labelled by its
  difference from it (``mamo``, ``denoising (vicreg=false)``); only a run with exactly
  the baseline's params is called "baseline".
- histories (run name -> pretraining loss terms per step) and the retrieval gallery.

Runs that differ only in ``seed`` form one group (mean ± std over seeds). Groups that
differ in exactly one setting are compared with a paired bootstrap over the test split's
independent units (:mod:`dmp_core.stats`): binding groups where ranks.npz has
``clusters`` that join images (the synthetic set), else images. Groups with >= 2 seeds in
common also get the Student t interval of the mean per-seed difference. Every number in
the report comes from these inputs.

results.md opens with the verdict, a table of claims: one row per comparison (denoising −
MAMO, denoising − frozen towers, MAMO − frozen towers, or any other one-setting
difference), value of each data fraction that varies, and model (finetuned, zero-shot):
the mean per-seed difference of R mean with its 95% t interval, the seeds, and the claim,
made only with >= 3 seeds (``RECIPE_MIN_SEEDS``) and an interval that excludes 0; under it,
the points short of seeds and, given a study's plan (:class:`PlannedRun`, from ``DIR/plan.json``),
the planned points not run yet, a count of the diagnostic flags (their table opens the
Diagnostics section) and chance. Where ``pretrain.data_fraction`` ("pretraining fraction")
or ``data.fraction`` ("whole-pipeline fraction") takes >= 2 values among otherwise equal
methods, a data-scaling section per axis gives which images each stage saw, the missing
points, R mean against the fraction (figure, log x, across-seed t bands) and, per
fraction, each method's mean ± std and the paired differences with their claims.

The markdown depends only on the runs and the arguments (sorted names, no time, no
absolute path), so a committed report regenerates byte for byte from its exported runs in
any clone, DVC experiments or not (figures may differ in rendering)::

    dmp report --only-runs --runs reports/photos/runs \\
        --params reports/photos/params.yaml --reports reports/photos

Modules, each importing only those above it:

- ``runs``: params canonicalised and labelled by their difference from the baseline,
  :class:`Run`, merged duplicates, seed groups (:class:`Group`), the stale warnings;
- ``tables``: number and markdown formatting, the main, diagnostic flags, diagnostics,
  training-length and provenance tables;
- ``verdict``: the paired bootstrap comparisons, the tests against chance, their tables,
  the claims (paired per-seed t intervals) and the verdict table, the comparisons in words;
- ``scaling``: per data-fraction axis, the per-fraction table, the missing points and the
  images each stage saw;
- ``figures``: the loss, scaling and ablation plots (matplotlib);
- ``gallery``: the retrieval gallery (:class:`GalleryData`, :func:`load_gallery`);
- ``build``: :func:`build_report`, the one entry point, which writes results.md.

This package re-exports the names that ``orchestration`` and the tests import from it.
"""
from __future__ import annotations

from dmp_core.report.build import build_report
from dmp_core.report.figures import loss_columns
from dmp_core.report.gallery import GalleryData, gallery_caption, load_gallery
from dmp_core.report.runs import (
    PlannedRun,
    Run,
    canonical_params,
    group_runs,
    merge_duplicates,
    metrics_to_models,
    param_diff,
    resolve_params,
    stale_warnings,
)
from dmp_core.report.tables import main_table, scaling_policy, scaling_table
from dmp_core.report.verdict import BOOTSTRAP_SEED

__all__ = [
    "BOOTSTRAP_SEED",
    "GalleryData",
    "PlannedRun",
    "Run",
    "build_report",
    "canonical_params",
    "gallery_caption",
    "group_runs",
    "load_gallery",
    "loss_columns",
    "main_table",
    "merge_duplicates",
    "metrics_to_models",
    "param_diff",
    "resolve_params",
    "scaling_policy",
    "scaling_table",
    "stale_warnings",
]
