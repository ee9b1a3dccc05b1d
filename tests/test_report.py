"""The report on synthetic runs built in temporary folders: labels by difference from the
HEAD params, the stale warning, seed groups, bootstrap intervals, the verdict, chance rows,
the scaling policy, the gallery caption, and the git/DVC readers on a tiny git repository."""
from __future__ import annotations

import io
import json
import re
import statistics
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dmp_core.config import apply_dotted, config_from_dict
from dmp_core.report.tables import _md, diagnostics_table, flags_table
from dmp_core.report.verdict import claims_table, comparisons
from dmp_core.report import (
    BOOTSTRAP_SEED,
    GalleryData,
    Run,
    build_report,
    canonical_params,
    gallery_caption,
    group_runs,
    loss_columns,
    main_table,
    merge_duplicates,
    metrics_to_models,
    resolve_params,
    scaling_policy,
    scaling_table,
    stale_warnings,
)
from dmp_core.stats import (
    Ranks,
    bootstrap_vs_chance,
    chance_recall,
    paired_bootstrap,
    recalls_from_ranks,
    seed_interval,
)

N_IMAGES, CAPTIONS = 40, 2
TXT2IMG = np.repeat(np.arange(N_IMAGES), CAPTIONS)
SAMPLES = 300  # bootstrap resamples in these tests (the report's default is 2000)


def _nested(overrides: dict) -> dict:
    return apply_dotted({}, overrides)


def _params(**overrides) -> dict:
    """Canonical params of the schema defaults with dotted overrides (``objective__vicreg=False``)."""
    return canonical_params(config_from_dict(_nested({k.replace("__", "."): v for k, v in overrides.items()})))


BASELINE = _params()


def _ranks(quality: float, seed: int) -> dict[str, np.ndarray]:
    """ranks.npz of a model that puts the gold first with probability ``quality`` (else at random)."""
    rng = np.random.default_rng(seed)
    out = {"txt2img": TXT2IMG}
    for model, shift in (("finetune", 0.0), ("pretrain", -0.2)):
        q = max(quality + shift, 0.0)
        for scorer, extra in (("itm", 0.0), ("itc", -0.05)):
            p = max(q + extra, 0.0)
            out[f"{model}_{scorer}_tr"] = np.where(rng.random(N_IMAGES) < p, 0, rng.integers(0, N_IMAGES * CAPTIONS, N_IMAGES))
            out[f"{model}_{scorer}_ir"] = np.where(rng.random(len(TXT2IMG)) < p, 0, rng.integers(0, N_IMAGES, len(TXT2IMG)))
    return out


def _details(ranks: dict, diag: dict | None = None) -> dict:
    """details.json whose recall is computed from the ranks (as the evaluate stage does)."""
    models = {}
    for model in ("finetune", "pretrain"):
        models[model] = {s: recalls_from_ranks(ranks[f"{model}_{s}_tr"], ranks[f"{model}_{s}_ir"]) for s in ("itm", "itc")}
        models[model]["diagnostics"] = dict(diag or {"itm_auc": 0.9, "image_use_gap": 0.5, "text_use_gap": 0.1})
    return {"split": {"dataset": "synthetic", "name": "test", "image_size": 64, "images": N_IMAGES,
                      "texts": len(TXT2IMG)},
            "headline_scorer": "itm", "models": models}


def _run(name: str, quality: float, seed: int = 0, workspace: bool = False, diag: dict | None = None,
         training: dict | None = None, **overrides) -> Run:
    ranks = _ranks(quality, seed=zlib.crc32(f"{name}-{seed}".encode()))
    return Run(names=[name], params=_params(seed=seed, **overrides), workspace=workspace, rev=None if workspace else "abc1234",
               details=_details(ranks, diag), ranks=ranks, training=training or {},
               run_ids={"pretrain": f"pre-{name}", "finetune": f"ft-{name}"})


def _row(table: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(table), dtype=bool)
    for col, value in where.items():
        mask &= table[col] == value
    rows = table[mask]
    assert len(rows) == 1, (where, table.iloc[:, :3].to_string())
    return rows.iloc[0]


# ------------------------------------------------------------------ params and labels
def test_absent_keys_and_recipe_switches_compare_equal() -> None:
    lean, _ = resolve_params({"objective": {"variant": "denoising"}}, "lean")
    full, _ = resolve_params(json.loads(config_from_dict({}).model_dump_json()), "full")
    assert lean == full
    assert _params(objective__vicreg=True) == BASELINE  # true is the denoising recipe
    assert _params(objective__variant="mamo", objective__vicreg=False) == _params(objective__variant="mamo")
    assert _params(objective__vicreg=False)["objective.vicreg"] is False


def test_params_of_an_older_schema_are_compared_on_shared_keys() -> None:
    old = {"objective": {"variant": "mamo", "itc_queue_size": 0}, "pretrain": {"epochs": 1, "max_steps": 250, "lr": 1e-3}}
    params, note = resolve_params(old, "exp:params.yaml")
    assert note.startswith("exp:params.yaml: unknown key 'objective.itc_queue_size'")
    assert "dropped: objective.itc_queue_size, pretrain.max_steps, pretrain.epochs" in note
    assert params == _params(objective__variant="mamo", pretrain__lr=1e-3)  # steps at the schema default


def test_labels_name_the_difference_from_head_and_duplicates_merge(tmp_path) -> None:
    """The README workflow: HEAD holds the denoising baseline; the workspace ran the vicreg ablation
    as an experiment; a mamo experiment exists. The baseline keeps its label and numbers."""
    head = _run("HEAD (abc1234)", 0.6)
    ablation = _run("exp-novic", 0.2, objective__vicreg=False)
    workspace = Run(**{**ablation.__dict__, "names": ["workspace"], "workspace": True, "rev": None})
    mamo = _run("mamo-default", 0.4, objective__variant="mamo")
    runs = [workspace, head, ablation, mamo]

    groups = group_runs(merge_duplicates(runs), BASELINE)
    assert [g.label for g in groups] == ["denoising (baseline)", "denoising (vicreg=false)", "mamo"]
    assert groups[1].runs[0].names == ["workspace", "exp-novic"]  # same params and metrics: one row

    table = main_table(groups, runs)
    base = _row(table, Method="denoising (baseline)", Model="finetuned")
    assert base["R mean"] == f"{head.details['models']['finetune']['itm']['r_mean']:.1f}"
    assert base["Runs"] == "HEAD (abc1234)" and base["Scorer"] == "ITM re-ranked"
    assert _row(table, Method="denoising (vicreg=false)", Model="finetuned")["Runs"] == "workspace, exp-novic"

    warnings = stale_warnings(workspace.params, BASELINE, "HEAD abc1234 (params.yaml)", ["params", "download", "report"])
    assert len(warnings) == 1 and "objective.vicreg=false (baseline recipe)" in warnings[0]
    text = build_report(runs, tmp_path, baseline=BASELINE, baseline_source="HEAD abc1234 (params.yaml)",
                        warnings=warnings, bootstrap_samples=SAMPLES, include_seed_numbers=False).read_text()
    top = text.split("\n## ")[0]
    assert "**Warning:**" in top and "objective.vicreg" in top
    assert "denoising (baseline)" not in _provenance(text, "workspace, exp-novic")


def _provenance(text: str, run: str) -> str:
    return next(line for line in text.split("## Provenance")[1].splitlines() if line.startswith(f"| {run} "))


def test_no_row_is_called_baseline_unless_its_params_equal_head() -> None:
    """The workspace ran an ablation and nothing at HEAD params exists: no "baseline" label anywhere."""
    runs = [_run("workspace", 0.3, workspace=True, objective__vicreg=False), _run("mamo-default", 0.3, objective__variant="mamo")]
    labels = [g.label for g in group_runs(runs, BASELINE)]
    assert labels == ["denoising (vicreg=false)", "mamo"]


def test_stale_warnings_name_stale_stages_and_ignore_always_changed_ones() -> None:
    assert stale_warnings(BASELINE, BASELINE, "HEAD", ["params", "download", "report"]) == []
    lines = stale_warnings(BASELINE, BASELINE, "HEAD", ["dvc.yaml:pretrain", "evaluate", "report"])
    assert len(lines) == 1 and "pretrain, evaluate" in lines[0] and "report" not in lines[0].split(":")[1]
    seeded = stale_warnings(_params(seed=3), BASELINE, "HEAD", [])
    assert len(seeded) == 1 and "seed=3" in seeded[0]


# ------------------------------------------------------------------ tables and statistics
@pytest.fixture
def study() -> list[Run]:
    runs = [_run("workspace", 0.6, workspace=True)]
    runs += [_run(f"den-s{s}", 0.6, seed=s) for s in (1, 2)]
    runs += [_run(f"mamo-s{s}", 0.3, seed=s, objective__variant="mamo") for s in (0, 1, 2)]
    runs += [_run("pixel-s0", 0.5, objective__mim_target="pixel")]
    return runs


def test_seed_groups_show_mean_and_std_and_a_chance_row(study) -> None:
    groups = group_runs(study, BASELINE)
    table = main_table(groups, study, include_seed_numbers=True)
    mamo = _row(table, Method="mamo", Model="finetuned")
    values = [r.details["models"]["finetune"]["itm"]["ir_r1"] for r in study if r.names[0].startswith("mamo")]
    assert mamo["IR R@1"] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    assert mamo["Seeds"] == "3 (0, 1, 2)" and mamo["Dataset"] == "synthetic" and mamo["Image size"] == "64 px"
    zero_shot = _row(table, Method="mamo", Model="zero-shot")
    itc = [r.details["models"]["pretrain"]["itc"]["r_mean"] for r in study if r.names[0].startswith("mamo")]
    assert zero_shot["ITC R mean"] == f"{statistics.mean(itc):.1f} ± {statistics.stdev(itc):.1f}"
    chance = _row(table, Method="chance (random ranking, exact)")
    exact = chance_recall(TXT2IMG)
    assert chance["TR R@5"] == f"{exact['tr_r5']:.2f}" and chance["R mean"] == f"{exact['r_mean']:.2f}"
    assert "40 images / 80 captions" in chance["Runs"]
    reported = table[table["Method"].str.contains("reported")]
    assert len(reported) == 3 and set(reported["Dataset"]) == {"flickr30k", "coco"}
    assert (reported["Scorer"].str.contains("ALBEF")).all()


def test_statistics_give_the_paired_bootstrap_of_seed_0_and_per_seed_differences(study, tmp_path) -> None:
    text = build_report(study, tmp_path, baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    den, mamo = study[0], study[3]  # seed 0 of each group
    want = paired_bootstrap(Ranks(den.ranks["finetune_itm_tr"], den.ranks["finetune_itm_ir"]),
                            Ranks(mamo.ranks["finetune_itm_tr"], mamo.ranks["finetune_itm_ir"]),
                            TXT2IMG, n_samples=SAMPLES, seed=BOOTSTRAP_SEED)
    r = want["r_mean"]
    cell = f"{r['diff']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]".replace("-", "−")
    row = next(line for line in text.splitlines() if line.startswith("| denoising (baseline) − mamo "))
    assert cell in row and "workspace vs mamo-s0" in row
    per_seed = [study[i].details["models"]["finetune"]["itm"]["r_mean"] - study[j].details["models"]["finetune"]["itm"]["r_mean"]
                for i, j in ((0, 3), (1, 4), (2, 5))]
    assert f"{np.mean(per_seed):+.1f} ± {np.std(per_seed, ddof=1):.1f} (3 seeds)".replace("-", "−") in row
    # the pixel ablation is compared with its base; mamo and pixel differ in two settings: no row
    assert re.search(r"^\| denoising \(mim_target=pixel\) − denoising \(baseline\) ", text, re.M)
    assert "− denoising (mim_target=pixel)" not in text and "mamo − " not in text


def test_verdict_quotes_the_interval_and_flags_reranking_diagnostics_and_chance(tmp_path) -> None:
    good = _run("workspace", 0.9, workspace=True)
    weak = _run("mamo-default", 0.0, objective__variant="mamo",
                diag={"itm_auc": 0.52, "itm_auc_random": 0.9, "image_use_gap": 0.01, "image_use_gap_rel": 0.005,
                      "text_use_gap_rel": 0.3})
    ft = weak.details["models"]["finetune"]
    ft["itm"]["r_mean"], ft["itc"]["r_mean"] = 3.0, 4.5  # re-ranking lowers the ranking
    text = build_report([good, weak], tmp_path, baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    verdict, words = _verdict(text), _words(text)
    r = paired_bootstrap(Ranks(good.ranks["finetune_itm_tr"], good.ranks["finetune_itm_ir"]),
                         Ranks(weak.ranks["finetune_itm_tr"], weak.ranks["finetune_itm_ir"]),
                         TXT2IMG, n_samples=SAMPLES, seed=BOOTSTRAP_SEED)["r_mean"]
    assert f"R mean {r['diff']:+.1f} points".replace("-", "−") in words
    assert "excludes 0: denoising is better" in words
    # the flags: one row per method and model in the diagnostics section, counted in the verdict
    flags = flags_table(group_runs([good, weak], BASELINE))
    assert _md(flags) in text.split("## Diagnostics")[1].split("### Per run")[0]
    weak_ft = _row(flags, Method="mamo", Model="finetuned")
    assert weak_ft["re-ranked R mean < ITC R mean"] == "1 of 1: 3.0 < 4.5"  # a defect of the re-ranker
    assert weak_ft["ITM AUC on the ITC top-k < 0.6"] == "1 of 1: 0.520"
    assert weak_ft["ITM AUC vs random negatives < 0.6"] == "no (0 of 1)"  # it does match against random negatives
    assert weak_ft["relative image-use gap < 0.02"] == "1 of 1: 0.005"
    assert weak_ft["relative text-use gap < 0.02"] == "no (0 of 1)"  # the other modality is used
    assert _row(flags, Method="denoising (baseline)", Model="finetuned")["ITM AUC on the ITC top-k < 0.6"] == "no (0 of 1)"
    assert "ITM below its floor in 2 of 4 models, a modality unused in 2, the re-ranking below its own ITC in" in verdict
    assert "The ITM head of" not in text and "Re-ranking ranks below" not in text  # no longer prose
    assert f"Chance R mean on synthetic test, 40 images / 80 captions is {chance_recall(TXT2IMG)['r_mean']:.2f}" in verdict
    assert "does not exclude chance" in verdict and "mamo-default (finetuned)" in verdict  # the model at chance
    # a tie: the interval includes 0 and the verdict says so
    same = _run("mamo-twin", 0.9, objective__variant="mamo")
    same.ranks, same.details = good.ranks, good.details
    tied = build_report([good, same], tmp_path / "tie", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    assert "includes 0: no difference can be claimed" in tied


def test_the_per_run_table_shows_the_val_gate_and_its_decision(tmp_path) -> None:
    """A model evaluated with ``eval.rerank_gate`` shows its val gain over ITC, the interval and
    whether the re-ranker was kept; a model evaluated without the gate shows only its knobs, and
    the section's legend mentions the gate only when some model went through it."""
    knobs = {"rerank_k": 16, "rerank_itc_weight": 2.0, "rerank_fit_step": 0}
    reset = _run("workspace", 0.9, workspace=True, diag={**knobs, "rerank_val_gain": 0.8133, "rerank_val_gain_lo": -0.2067,
                                                         "rerank_val_gain_hi": 1.8267, "rerank_kept": 0})
    kept = _run("mamo-default", 0.5, objective__variant="mamo",
                diag={**knobs, "rerank_fit_step": 600, "rerank_val_gain": 1.08, "rerank_val_gain_lo": 0.087,
                      "rerank_val_gain_hi": 2.127, "rerank_kept": 1})
    table = diagnostics_table(group_runs([reset, kept], BASELINE))
    column = "k, ITC weight, fit step (val)"
    assert _row(table, Run="workspace", Model="finetuned")[column] == "16, 2, 0; val +0.81 [−0.21, +1.83]: ITC's order"
    assert _row(table, Run="mamo-default", Model="finetuned")[column] == "16, 2, 600; val +1.08 [+0.09, +2.13]: kept"
    text = build_report([reset, kept], tmp_path / "gated", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    assert "where the val gate was on (eval.rerank_gate)" in text
    plain = _run("plain", 0.9, workspace=True, diag=knobs)
    assert _row(diagnostics_table(group_runs([plain], BASELINE)), Model="finetuned")[column] == "16, 2, 0"
    text = build_report([plain], tmp_path / "plain", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    assert "val gate" not in text


CLUSTERS = np.repeat(np.arange(N_IMAGES // 2), 2)  # binding groups of 2 images (as ranks.npz stores them)


def _cell(r: dict) -> str:
    return f"{r['diff']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]".replace("-", "−")


def _verdict(text: str) -> str:
    return text.split("## Verdict")[1].split("\n## ")[0]


def _words(text: str) -> str:
    """The comparisons in words (Statistics section)."""
    return text.split("### The comparisons in words")[1].split("\n### ")[0]


def _stats_row(text: str, title: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {title} "))


def _r_mean(run: Run) -> float:
    return run.details["models"]["finetune"]["itm"]["r_mean"]


def _finetune_ranks(run: Run) -> Ranks:
    return Ranks(run.ranks["finetune_itm_tr"], run.ranks["finetune_itm_ir"])


def test_bootstrap_resamples_binding_groups_and_names_the_unit(tmp_path) -> None:
    """ranks.npz ``clusters`` makes the binding group the resampled unit, for the paired bootstrap and
    the chance test; a run written before the field (no clusters) shares the split's groups."""
    good = _run("workspace", 0.7, workspace=True)
    good.ranks["clusters"] = CLUSTERS
    old = _run("mamo-default", 0.4, objective__variant="mamo")  # evaluate output without clusters
    text = build_report([good, old], tmp_path, baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    by_group = paired_bootstrap(_finetune_ranks(good), _finetune_ranks(old), TXT2IMG, n_samples=SAMPLES,
                                seed=BOOTSTRAP_SEED, clusters=CLUSTERS)["r_mean"]
    by_image = paired_bootstrap(_finetune_ranks(good), _finetune_ranks(old), TXT2IMG, n_samples=SAMPLES,
                                seed=BOOTSTRAP_SEED)["r_mean"]
    assert _cell(by_group) != _cell(by_image)
    row = _stats_row(text, "denoising (baseline) − mamo")
    assert _cell(by_group) in row and "binding groups (20 clusters of 40 images)" in row
    assert "Resampling unit here: binding groups (20 clusters of 40 images)" in text
    assert "over binding groups (20 clusters of 40 images)" in _words(text)
    chance = bootstrap_vs_chance(_finetune_ranks(old), TXT2IMG, n_samples=SAMPLES, seed=BOOTSTRAP_SEED,
                                 clusters=None)["r_mean"]
    chance_row = next(line for line in text.split("Models against chance")[1].splitlines()
                      if line.startswith("| mamo-default ") and "finetuned" in line)
    assert "binding groups" not in chance_row and "images (40)" in chance_row  # its own file has no groups
    assert _cell(chance) in chance_row
    chance = bootstrap_vs_chance(_finetune_ranks(good), TXT2IMG, n_samples=SAMPLES, seed=BOOTSTRAP_SEED,
                                 clusters=CLUSTERS)["r_mean"]
    chance_row = next(line for line in text.split("Models against chance")[1].splitlines()
                      if line.startswith("| workspace ") and "finetuned" in line)
    assert _cell(chance) in chance_row and "binding groups (20 clusters of 40 images)" in chance_row

    # no clusters anywhere (a real dataset, or older outputs): the unit is the image, named as such
    plain = _run("workspace", 0.7, workspace=True)
    text = build_report([plain, old], tmp_path / "plain", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    row = _stats_row(text, "denoising (baseline) − mamo")
    assert _cell(by_image) in row and "images (40)" in row and "binding groups (" not in text
    # two runs whose groups disagree are not on the same split
    other = _run("mamo-default", 0.4, objective__variant="mamo")
    other.ranks["clusters"] = np.arange(N_IMAGES) // 4
    text = build_report([good, other], tmp_path / "clash", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    assert "different test splits (their binding groups differ)" in _stats_row(text, "denoising (baseline) − mamo")


def test_two_common_seeds_give_the_across_seed_t_interval(tmp_path) -> None:
    from scipy.stats import t

    runs = [_run("workspace" if s == 0 else f"den-s{s}", 0.6, seed=s, workspace=s == 0) for s in (0, 1)]
    runs += [_run(f"mamo-s{s}", 0.4, seed=s, objective__variant="mamo") for s in (0, 1)]
    text = build_report(runs, tmp_path, baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    diffs = [_r_mean(runs[i]) - _r_mean(runs[i + 2]) for i in (0, 1)]
    mean, half = np.mean(diffs), t.ppf(0.975, 1) * np.std(diffs, ddof=1) / np.sqrt(2)
    cell = f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (t, 1 dof)".replace("-", "−")
    row = _stats_row(text, "denoising (baseline) − mamo")
    assert cell in row and "(2 seeds)" in row
    verdict = _words(text)
    interval = f"95% t interval [{mean - half:+.1f}, {mean + half:+.1f}] (1 dof)".replace("-", "−")
    assert "Over the 2 seeds both ran" in verdict and interval in verdict
    assert "for these 2-seed runs (2 seeds each)" in verdict
    assert "as a recipe" not in verdict and "as recipes" not in verdict
    assert "not a claim about the recipes: that needs >= 3 seeds of each (denoising 2, MAMO 2)" in verdict


def test_verdict_speaks_of_recipes_only_with_three_seeds_each(study, tmp_path) -> None:
    one = [_run("workspace", 0.7, workspace=True), _run("mamo-s0", 0.3, objective__variant="mamo")]
    verdict = _words(build_report(one, tmp_path / "one", baseline=BASELINE, bootstrap_samples=SAMPLES).read_text())
    assert "excludes 0: denoising is better for these two checkpoints (1 seed each) on this test split" in verdict
    assert "as a recipe" not in verdict and "as recipes" not in verdict and "t interval" not in verdict
    assert "needs >= 3 seeds of each (denoising 1, MAMO 1)" in verdict

    # 3 seeds of each (the study): the claim rests on the across-seed interval; the bootstrap is named
    # as the within-test-set uncertainty of one pair of checkpoints
    verdict = _words(build_report(study, tmp_path / "three", baseline=BASELINE,
                                    bootstrap_samples=SAMPLES).read_text())
    per_seed = [_r_mean(study[i]) - _r_mean(study[j]) for i, j in ((0, 3), (1, 4), (2, 5))]
    ci = seed_interval(per_seed)
    assert ci["lo"] > 0  # the synthetic study: denoising (quality 0.6) against MAMO (0.3)
    interval = f"[{ci['lo']:+.1f}, {ci['hi']:+.1f}] (2 dof)".replace("-", "−")
    assert "Denoising − MAMO as recipes (finetuned, ITM re-ranked; denoising 3 seeds, MAMO 3 seeds)" in verdict
    assert (f"95% t interval over seeds {interval}; the across-seed interval excludes 0: denoising is better than "
            f"MAMO as a recipe") in verdict
    boot = paired_bootstrap(_finetune_ranks(study[0]), _finetune_ranks(study[3]), TXT2IMG, n_samples=SAMPLES,
                            seed=BOOTSTRAP_SEED)["r_mean"]
    numbers = f"R mean {boot['diff']:+.1f} points, 95% CI [{boot['lo']:+.1f}, {boot['hi']:+.1f}]".replace("-", "−")
    assert ("within-test-set uncertainty of one pair of checkpoints (runs workspace vs mamo-s0): paired bootstrap "
            f"over images (40), {numbers}") in verdict
    assert "these two checkpoints" not in verdict and "-seed runs" not in verdict

    # 3 seeds against 1: the seed counts are stated and no recipe is compared
    uneven = study[:3] + [study[3]]
    verdict = _words(build_report(uneven, tmp_path / "uneven", baseline=BASELINE,
                                    bootstrap_samples=SAMPLES).read_text())
    assert "these 3-seed and 1-seed runs (denoising 3 seeds, MAMO 1 seed)" in verdict and "as a recipe" not in verdict


def test_a_run_missing_files_still_appears_with_what_it_has(tmp_path) -> None:
    old = Run(names=["old-exp"], params=_params(objective__variant="mamo"), rev="0ld0ld0",
              metrics={"finetune": {"itm_tr_r1": 21.5, "itc_r_mean": 30.0, "itm_r_mean": 25.0}, "pretrain": {}})
    text = build_report([_run("workspace", 0.5, workspace=True), old], tmp_path, baseline=BASELINE,
                        bootstrap_samples=SAMPLES).read_text()
    assert "old-exp: no details.json (recall from metrics.json" in text and "no ranks.npz" in text
    row = next(line for line in text.split("## Main results")[1].splitlines() if line.startswith("| mamo "))
    assert "21.5" in row and "25.0" in row and "30.0" in row
    assert "no ranks.npz for mamo" in text  # the comparison says why it has no interval


def test_metrics_json_of_the_current_contract_maps_to_models() -> None:
    models = metrics_to_models({"finetune": {"tr_r1": 10.0, "r_mean": 20.0, "itc_r_mean": 25.0},
                                "pretrain": {"r_mean": 5.0, "itc_r_mean": 6.0},
                                "diagnostics": {"finetune_itm_auc": 0.7, "pretrain_text_use_gap": None}})
    assert models["finetune"]["itm"] == {"tr_r1": 10.0, "r_mean": 20.0}
    assert models["finetune"]["itc"] == {"r_mean": 25.0} and models["pretrain"]["itc"] == {"r_mean": 6.0}
    assert models["finetune"]["diagnostics"] == {"itm_auc": 0.7}
    assert models["pretrain"]["diagnostics"] == {"text_use_gap": None}


def test_scaling_table_shows_trained_steps_and_epochs_and_names_the_policy() -> None:
    runs = []
    for variant, quality in (("denoising", 0.5), ("mamo", 0.3)):
        for fraction in (0.1, 0.5, 1.0):
            training = {"pretrain": {"steps": 500, "epochs": round(500 * 32 / (8000 * fraction), 2)},
                        "finetune": {"steps": 100, "epochs": round(100 * 32 / (8000 * fraction), 2)}}
            runs.append(_run(f"{variant}-{fraction}", quality * fraction, training=training,
                             objective__variant=variant, data__fraction=fraction))
    groups = group_runs(runs, BASELINE)
    table = scaling_table(groups)
    assert set(zip(table["Variant"], table["data.fraction"])) == {(v, f) for v in ("denoising", "mamo") for f in ("0.1", "0.5", "1")}
    row = _row(table, Variant="mamo", **{"data.fraction": "0.1"})
    assert (row["pretrain steps"], row["pretrain epochs"], row["finetune epochs"]) == ("500", "20", "4")
    policy = scaling_policy(groups)
    assert "pretrain: equal optimiser steps (pretrain.steps=500" in policy
    by_epochs = [Run(**{**r.__dict__, "params": {**r.params, "pretrain.steps": None, "pretrain.epochs": 1}}) for r in runs]
    assert "pretrain: equal epochs (pretrain.epochs=1" in scaling_policy(group_runs(by_epochs, BASELINE))
    assert set(scaling_table(group_runs(by_epochs, BASELINE))["Settings"]) == {"pretrain.epochs=1, pretrain.steps=null"}


# ------------------------------------------------------------------ figures and gallery
def _gallery(size: int) -> GalleryData:
    rng = np.random.default_rng(0)
    return GalleryData(images=rng.integers(0, 255, (6, size, size, 3), dtype=np.uint8),
                       captions=[f"caption {i}" for i in range(12)], txt2img=np.repeat(np.arange(6), 2),
                       scores={m: (rng.standard_normal((6, 12)), rng.standard_normal((12, 6))) for m in ("pretrain", "finetune")},
                       dataset="flickr8k")


def test_gallery_caption_names_dataset_size_and_enlargement() -> None:
    assert gallery_caption(_gallery(16)) == "flickr8k test split, images 16×16 px, shown enlarged 6× (nearest neighbour, 96 px on screen)"
    assert gallery_caption(_gallery(128)).endswith("images 128×128 px, shown pixel for pixel")
    assert gallery_caption(_gallery(384)).endswith("shown reduced to 224 px")


def test_build_report_writes_linked_plots_and_gallery(study, tmp_path) -> None:
    from PIL import Image

    steps = np.arange(0, 50, 5)
    histories = {
        "workspace": pd.DataFrame({"step": steps, "loss": 5 - steps / 20, "loss_mim": 1 - steps / 100, "val/loss": 9.0}),
        "mamo-s0": pd.DataFrame({"step": steps, "train/loss": 6 - steps / 20, "train/loss_mrm": 0.5}),
    }
    scaled = [_run(f"{v}-0.5", 0.3, objective__variant=v, data__fraction=0.5) for v in ("denoising", "mamo")]
    md_path = build_report(study + scaled, tmp_path, baseline=BASELINE, histories=histories, gallery=_gallery(128),
                           gallery_queries=2, bootstrap_samples=SAMPLES)
    text = md_path.read_text()
    for name in ("ablations.png", "scaling_data_fraction.png", "pretrain_losses.png", "gallery_pretrain.png",
                 "gallery_finetune.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
        assert f"(figures/{name})" in text, name
    assert "No " not in text.split("## Provenance")[0]  # nothing reported missing
    assert "ft-mamo-s1" in text and "| variant=mamo " in text  # provenance
    assert "flickr8k test split, images 128×128 px, shown pixel for pixel" in text
    width, height = Image.open(tmp_path / "figures" / "gallery_finetune.png").size
    assert width >= 5 * 128 and height >= 4 * 128  # 5 candidates and 4 query rows at full size


def test_missing_data_gives_sentences_not_empty_plots(tmp_path) -> None:
    only = [_run("workspace", 0.4, workspace=True)]
    text = build_report(only, tmp_path, baseline=BASELINE, bootstrap_samples=SAMPLES).read_text()
    assert "No ablation chart" in text and "No data-scaling results" in text
    assert "No loss curves" in text and "No gallery" in text and "No pair of methods" in text
    assert "No denoising − MAMO interval" in text
    assert not list((tmp_path / "figures").glob("*.png"))
    nothing = build_report([], tmp_path / "empty", baseline=BASELINE).read_text()
    assert "No finished runs" in nothing


def test_loss_columns_ignore_validation_curves() -> None:
    frame = pd.DataFrame(columns=["step", "loss", "loss_itc", "train/loss_mim", "val/loss", "lr"])
    assert loss_columns(frame) == {"loss": "loss", "loss_itc": "loss_itc", "train/loss_mim": "loss_mim"}


# ------------------------------------------------------------------ git, DVC and MLflow readers
def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def _write_outputs(root, run: Run, steps: int) -> None:
    evaluate = root / "reports/evaluate"
    evaluate.mkdir(parents=True, exist_ok=True)
    (evaluate / "details.json").write_text(json.dumps(run.details))
    buf = io.BytesIO()
    np.savez_compressed(buf, **run.ranks)
    (evaluate / "ranks.npz").write_bytes(buf.getvalue())
    for stage in ("pretrain", "finetune"):
        (root / "reports" / stage).mkdir(parents=True, exist_ok=True)
        (root / "reports" / stage / "metrics.json").write_text(json.dumps({"steps": steps, "epochs": 1}))
        (root / "reports" / stage / "run.json").write_text(json.dumps({"run_id": f"{stage}-{steps}"}))
    (root / "reports/pretrain/history.csv").write_text("step,loss,loss_itc\n0,5.0,2.0\n10,4.0,1.5\n")


def test_collect_reads_head_and_experiment_commits_with_git_show(tmp_path, monkeypatch) -> None:
    """A tiny git repository: HEAD holds the (lean) baseline params and its outputs; an experiment
    commit holds the mamo run; the workspace changed params and outputs (the vicreg ablation)."""
    from orchestration.runs import collect, experiment_refs, experiment_run

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    head_run, exp_run, ws_run = _run("h", 0.6), _run("e", 0.3, objective__variant="mamo"), _run("w", 0.2, objective__vicreg=False)
    (repo / "params.yaml").write_text(yaml.safe_dump({"objective": {"variant": "mamo"}}))
    _write_outputs(repo, exp_run, steps=7)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "experiment")
    exp_sha = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "objective": {"variant": "denoising"}}))
    _write_outputs(repo, head_run, steps=5)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")
    head_sha = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "params.yaml").write_text(yaml.safe_dump({"objective": {"variant": "denoising", "vicreg": False}}))
    _write_outputs(repo, ws_run, steps=3)
    monkeypatch.chdir(repo)

    cfg = config_from_dict({"objective": {"variant": "denoising", "vicreg": False}})
    inputs = collect(cfg, use_dvc=False, use_mlflow=False)
    assert inputs.baseline == BASELINE and inputs.baseline_source == f"HEAD {head_sha} (params.yaml)"
    names = [r.names[0] for r in inputs.runs]
    assert names == ["workspace", f"HEAD ({head_sha})"]
    head = inputs.runs[1]
    for key, array in head_run.ranks.items():
        np.testing.assert_array_equal(head.ranks[key], array)  # binary-safe git show
    assert head.details == json.loads(json.dumps(head_run.details)) and head.training["pretrain"]["steps"] == 5
    assert head.run_ids == {"pretrain": "pretrain-5", "finetune": "finetune-5"}
    assert len(inputs.warnings) == 1 and "objective.vicreg=false" in inputs.warnings[0]
    assert set(inputs.histories) == {"workspace", f"HEAD ({head_sha})"}

    rows = [{"Experiment": None, "rev": "workspace", "typ": "baseline"},
            {"Experiment": None, "rev": "main", "typ": "baseline"},
            {"Experiment": "mamo-default", "rev": exp_sha, "typ": "branch_commit", "State": None},
            {"Experiment": "queued", "rev": "fffffff", "typ": "branch_base", "State": "Queued"}]
    assert experiment_refs(rows) == [("mamo-default", exp_sha)]
    exp, history = experiment_run("mamo-default", exp_sha, Path("params.yaml"), Path("reports"))
    assert exp.params == _params(objective__variant="mamo") and exp.training["finetune"]["steps"] == 7
    assert history["loss"].tolist() == [5.0, 4.0]
    np.testing.assert_array_equal(exp.ranks["finetune_itm_ir"], exp_run.ranks["finetune_itm_ir"])

    # the workspace re-ran HEAD's params with other results (code changed): HEAD's row is not a second seed
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "objective": {"variant": "denoising"}}))
    again = collect(config_from_dict({}), use_dvc=False, use_mlflow=False)
    assert [r.names for r in again.runs] == [["workspace"]] and again.warnings == []
    assert any("the workspace's run is reported, not the committed one" in n for n in again.notes)
    _write_outputs(repo, head_run, steps=5)  # the same results as HEAD: both names, one row
    merged = merge_duplicates(collect(config_from_dict({}), use_dvc=False, use_mlflow=False).runs)
    assert [r.names for r in merged] == [["workspace", f"HEAD ({head_sha})"]]


def test_stale_stages_come_from_dvc_status_and_skip_always_changed_stages(tmp_path, monkeypatch) -> None:
    from dvc.repo import Repo

    from orchestration.runs import stale_stages

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _git(tmp_path, "init", "-q")
    Repo.init(".")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "evaluate": {"cmd": "cp in.txt out.txt", "deps": ["in.txt"], "outs": ["out.txt"]},
        "report": {"cmd": "true", "always_changed": True}}}))
    (tmp_path / "in.txt").write_text("x")
    stages, why = stale_stages()  # nothing ran yet: evaluate has no lock entry
    assert why is None and stages == ["evaluate", "report"]
    lines = stale_warnings(BASELINE, BASELINE, "HEAD", stages)
    assert len(lines) == 1 and "not up to date: evaluate." in lines[0]


def test_report_cli_on_a_workspace_without_git_or_dvc(tmp_path, monkeypatch) -> None:
    """``dmp report`` outside a repository: the workspace only, with its params as the baseline, said so."""
    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"objective": {"variant": "denoising"}}))
    (tmp_path / "reports/evaluate").mkdir(parents=True)
    (tmp_path / "reports/evaluate/metrics.json").write_text(json.dumps({"finetune": {"ir_r1": 12.5, "r_mean": 20.0}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    result = CliRunner().invoke(app, ["report", "--params", "params.yaml", "--no-experiments"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "reports/results.md").read_text()
    assert "12.5" in text and "the workspace params (no git commit)" in text
    assert "denoising (baseline)" in text and "**Warning:**" not in text


def test_experiment_run_ids_and_curves_come_from_mlflow(tmp_path, monkeypatch) -> None:
    """An experiment's run ids are found by its ``dvc.exp_name`` tag, its curves by metric history.

    On a file store (a SQLite store would spend ~10 s in schema migrations); the
    functions only use the client API, which both stores serve alike."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from orchestration.runs import find_run_ids, mlflow_history

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    exp_id = client.create_experiment("dmp-synthetic", artifact_location=(tmp_path / "art").as_uri())
    ids = {}
    for name in ("abl-mamo-s0", "abl-mamo-s1"):
        for stage in ("pretrain", "finetune"):
            run = client.create_run(exp_id, tags={"dvc.exp_name": name, "dmp.stage": stage})
            ids[name, stage] = run.info.run_id
    pre = ids["abl-mamo-s1", "pretrain"]
    client.log_batch(pre, metrics=[Metric(key, value - step, 0, step) for step in (1, 2, 3)
                                   for key, value in (("loss", 9.0), ("loss_mrm", 2.0), ("lr", 0.1))])
    assert find_run_ids(client, "abl-mamo-s1") == {"pretrain": pre, "finetune": ids["abl-mamo-s1", "finetune"]}
    history = mlflow_history(client, pre)
    assert history["step"].tolist() == [1, 2, 3] and history["loss_mrm"].tolist() == [1.0, 0.0, -1.0]
    assert "lr" not in history and mlflow_history(client, ids["abl-mamo-s0", "pretrain"]) is None


def test_the_frozen_tower_baseline_is_compared_with_both_variants(tmp_path) -> None:
    """Three variants at one setting: every difference reads denoising − MAMO − frozen towers."""
    shared = dict(model__preset="effnet_lite0_minilm", data__image_size=64)
    runs = [_run("den", 0.9, workspace=True, **shared), _run("mamo", 0.5, objective__variant="mamo", **shared),
            _run("frozen", 0.05, objective__variant="frozen", **shared)]
    text = build_report(runs, tmp_path, baseline=_params(**shared), bootstrap_samples=SAMPLES).read_text()
    verdict = _words(text)
    for title, better in (("Denoising − MAMO", "denoising is better"), ("Denoising − frozen towers", "denoising is better"),
                          ("MAMO − frozen towers", "MAMO is better")):
        assert title in verdict and better in verdict, title
    assert "frozen towers − " not in verdict and "MAMO − denoising" not in verdict
    # the verdict table: the three differences in that order, each model, one seed: no claim
    claims = claims_table(comparisons(group_runs(runs, _params(**shared)), _params(**shared), SAMPLES))
    assert list(zip(claims["Comparison (A − B)"], claims["Model"])) == [
        (c, m) for c in ("denoising − MAMO", "denoising − frozen towers", "MAMO − frozen towers")
        for m in ("finetuned", "zero-shot")]
    assert set(claims["Seeds"]) == {"1"} and set(claims["Claim"]) == {"no claim"}
    assert claims["Δ R mean [95% t interval]"].str.endswith(" (1 seed)").all()
    assert _md(claims) in _verdict(text)
    # frozen trains no MLM: its image-use gap (an MLM loss difference through an untrained head) is
    # neither shown nor flagged; the other variants keep theirs
    assert runs[2].diagnostics("finetune").keys() == {"itm_auc", "text_use_gap"}
    assert "image_use_gap" in runs[1].diagnostics("finetune")
    low = [_run(n, q, diag={"itm_auc": 0.9, "image_use_gap": 0.0, "image_use_gap_rel": 0.0, "text_use_gap": 0.1},
                **o, **shared) for n, q, o in (("den", 0.9, {}), ("frozen", 0.05, {"objective__variant": "frozen"}))]
    low[0].workspace = True
    flags = flags_table(group_runs(low, _params(**shared)))
    assert _row(flags, Method="denoising (baseline)", Model="finetuned")["relative image-use gap < 0.02"] == "1 of 1: 0.000"
    assert _row(flags, Method="frozen", Model="finetuned")["relative image-use gap < 0.02"] == "–"  # not measured


def test_a_run_without_results_is_no_seed_of_its_method() -> None:
    """A study clone's workspace has the baseline params but no outputs: it is noted, not counted."""
    empty = Run(names=["workspace"], params=_params(), workspace=True)
    groups = group_runs([empty, _run("seed-den-s0", 0.6), _run("seed-den-s1", 0.6, seed=1)], BASELINE)
    assert [[r.name for r in g.runs] for g in groups] == [["seed-den-s0", "seed-den-s1"]]
