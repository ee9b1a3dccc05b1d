"""The report built from exported run folders (``dmp report --runs DIR [--only-runs]``): a
pretraining-fraction study of 2 methods x 2 fractions x 3 seeds with one seed missing, written
as the export writes it (params.yaml, reports/evaluate/{metrics,details}.json, ranks.npz,
reports/<stage>/metrics.json) with synthetic numbers; the scaling section and the verdict
table against a brute-force t interval, the missing point named, and byte-identical
regeneration in a folder with no DVC experiments."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import t

from dmp_core.stats import recalls_from_ranks

N_IMAGES, CAPTIONS = 40, 2
TXT2IMG = np.repeat(np.arange(N_IMAGES), CAPTIONS)
SCORERS = ("rerank", "itc")
QUALITY = {"denoising": 0.8, "mamo": 0.35}  # chance of ranking the gold first (else a random rank)
FRACTIONS = (0.25, 1.0)
MISSING = ("mamo", 0.25, 2)  # the point that lacks a seed


def _ranks(quality: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {"txt2img": TXT2IMG}
    for model, shift in (("finetune", 0.0), ("pretrain", -0.15)):
        for scorer, extra in (("rerank", 0.0), ("itc", -0.05)):
            p = quality + shift + extra
            out[f"{model}_{scorer}_tr"] = np.where(rng.random(N_IMAGES) < p, 0, rng.integers(0, len(TXT2IMG), N_IMAGES))
            out[f"{model}_{scorer}_ir"] = np.where(rng.random(len(TXT2IMG)) < p, 0, rng.integers(0, N_IMAGES, len(TXT2IMG)))
    return out


def _write_export(root: Path, variant: str, fraction: float, seed: int) -> dict:
    """One exported run folder (the layout of orchestration/export.py); returns its details.json."""
    name = f"scale-{variant}-f{round(fraction * 100):03d}-s{seed}"
    folder = root / name
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    ranks = _ranks(QUALITY[variant] * (0.6 + 0.4 * fraction), rng)
    models = {}
    for model in ("finetune", "pretrain"):
        models[model] = {s: recalls_from_ranks(ranks[f"{model}_{s}_tr"], ranks[f"{model}_{s}_ir"]) for s in SCORERS}
        models[model]["diagnostics"] = {"itm_auc": (0.55 if variant == "mamo" else 0.8) + 0.01 * seed,
                                        "itm_auc_random": 0.9, "image_use_gap_rel": 0.1, "text_use_gap_rel": 0.1}
    details = {"split": {"dataset": "synthetic", "name": "test", "image_size": 64, "images": N_IMAGES,
                         "texts": len(TXT2IMG)}, "headline_scorer": "rerank", "k_test": 16, "models": models}
    metrics = {m: {"r_mean": models[m]["rerank"]["r_mean"], "itc_r_mean": models[m]["itc"]["r_mean"]}
               for m in ("finetune", "pretrain")}
    params = {"seed": seed, "objective": {"variant": variant}, "pretrain": {"data_fraction": fraction}}
    (folder / "reports/evaluate").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "reports/evaluate/details.json").write_text(json.dumps(details))
    (folder / "reports/evaluate/metrics.json").write_text(json.dumps(metrics))
    buf = io.BytesIO()
    np.savez_compressed(buf, **ranks)
    (folder / "reports/evaluate/ranks.npz").write_bytes(buf.getvalue())
    for stage, steps in (("pretrain", 500), ("finetune", 100)):
        (folder / "reports" / stage).mkdir()
        (folder / "reports" / stage / "metrics.json").write_text(json.dumps({"steps": steps, "epochs": 1.0}))
    (folder / "reports/pretrain/history.csv").write_text("step,loss,loss_itc\n0,5.0,2.0\n10,4.0,1.5\n")
    (folder / "reports/preprocess").mkdir()  # the split sizes preprocessing recorded (not the synthetic default's)
    (folder / "reports/preprocess/summary.json").write_text(json.dumps({"counts": {"train": {"images": 6000}}}))
    return details


@pytest.fixture
def study(tmp_path, monkeypatch) -> dict:
    """The exports under tmp_path/runs, a params.yaml (the baseline: schema defaults) in tmp_path,
    the working directory there, outside any git repository; returns (variant, fraction, seed) -> details."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"bootstrap_samples": 200}}))
    return {(v, f, s): _write_export(tmp_path / "runs", v, f, s)
            for v in QUALITY for f in FRACTIONS for s in range(3) if (v, f, s) != MISSING}


def _report(*args: str) -> str:
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _table(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after the line ``heading`` of results.md, as rows of cells."""
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    cells = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def _signed(value: float) -> str:
    value = 0.0 if round(value, 1) == 0 else value
    return f"{value:+.1f}".replace("-", "−")


def _r_mean(study: dict, variant: str, fraction: float, seed: int, model: str, scorer: str) -> float:
    return study[variant, fraction, seed]["models"][model][scorer]["r_mean"]


def _reference(study: dict, fraction: float, model: str, scorer: str) -> tuple[str, str]:
    """(cell, claim) of denoising − MAMO by brute force: the seeds both ran, mean ± t(0.975, n−1) · sd / √n."""
    seeds = [s for s in range(3) if ("mamo", fraction, s) != MISSING]
    diffs = [_r_mean(study, "denoising", fraction, s, model, scorer) - _r_mean(study, "mamo", fraction, s, model, scorer)
             for s in seeds]
    mean, sd, n = float(np.mean(diffs)), float(np.std(diffs, ddof=1)), len(diffs)
    half = t.ppf(0.975, n - 1) * sd / np.sqrt(n)
    claim = "no claim"
    if n >= 3 and (mean - half > 0 or mean + half < 0):
        claim = "denoising better" if mean > 0 else "MAMO better"
    return f"{_signed(mean)} [{_signed(mean - half)}, {_signed(mean + half)}]", claim


def _mean_std(study: dict, variant: str, fraction: float, model: str, scorer: str) -> str:
    values = [_r_mean(study, variant, fraction, s, model, scorer) for s in range(3) if (variant, fraction, s) in study]
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f} ({len(values)})"


def test_the_scaling_section_and_verdict_match_a_brute_force_reference(study, tmp_path) -> None:
    _report("--only-runs", "--runs", "runs", "--reports", "out")
    text = (tmp_path / "out/results.md").read_text()

    scaling = _table(text, "### Per pretraining fraction")
    assert len(scaling) == 2 * 2 * 2  # model x scorer x fraction
    for row in scaling:
        model = {"finetuned": "finetune", "zero-shot": "pretrain"}[row["Model"]]
        scorer = {"residual re-ranked": "rerank", "ITC only": "itc"}[row["Scorer"]]
        fraction = float(row["pretraining fraction"])
        for variant, column in (("denoising", "denoising"), ("mamo", "MAMO")):
            assert row[column] == _mean_std(study, variant, fraction, model, scorer), (row, variant)
        cell, claim = _reference(study, fraction, model, scorer)
        seeds = 2 if fraction == 0.25 else 3
        assert row["denoising − MAMO"] == f"{cell} ({seeds}): {claim}", row

    verdict = _table(text, "## Verdict")
    assert [(r["Comparison (A − B)"], r["pretraining fraction"], r["Model"]) for r in verdict] == [
        ("denoising − MAMO", f, m) for f in ("0.25", "1") for m in ("finetuned", "zero-shot")]
    for row in verdict:
        model = {"finetuned": "finetune", "zero-shot": "pretrain"}[row["Model"]]
        cell, claim = _reference(study, float(row["pretraining fraction"]), model, "rerank")
        assert (row["Δ R mean [95% t interval]"], row["Claim"]) == (cell, claim)
        assert row["Seeds"] == ("2" if row["pretraining fraction"] == "0.25" else "3")
    assert ("finetuned", "denoising better") in {(r["Model"], r["Claim"]) for r in verdict}  # the study is built so
    assert {r["Claim"] for r in verdict if r["pretraining fraction"] == "0.25"} == {"no claim"}  # 2 seeds

    partial = "MAMO at pretraining fraction 0.25: 2 seeds (0, 1; missing 2)"
    top, scaling_section = text.split("\n## Main results")[0], text.split("\n## Data scaling: pretraining fraction")[1]
    assert partial in top and f"Partial study: these points have fewer seeds than a claim needs (>= 3) " \
        f"or than the other points: {partial}." in scaling_section
    partial_lines = [line for line in text.splitlines() if "Partial" in line]
    assert partial_lines and not any("denoising at pretraining fraction 0.25" in line for line in partial_lines)
    assert ("pretraining saw the nested fraction f of the training split (f = 0.25: 1,500 images, 1: 6,000 images); "
            "finetuning and the re-ranker's refit saw the full training split (6,000 images); evaluation: synthetic "
            "test, 40 images / 80 captions") in scaling_section
    assert (tmp_path / "out/figures/scaling_pretrain_data_fraction.png").stat().st_size > 1000
    assert "(figures/scaling_pretrain_data_fraction.png)" in scaling_section
    # the main table keeps the baseline fraction; the flags of the MAMO ITM head sit in the diagnostics table
    assert {r["Method"] for r in _table(text, "## Main results") if r["Seeds"] != "–"} == {"denoising (baseline)", "mamo"}
    flags = {(r["Method"], r["Model"]): r for r in _table(text, "## Diagnostics")}
    assert flags["mamo", "finetuned"]["ITM AUC on the ITC top-k < 0.6"] == "3 of 3: 0.550, 0.560, 0.570"
    assert flags["mamo (pretrain.data_fraction=0.25)", "zero-shot"]["ITM AUC on the ITC top-k < 0.6"] == "2 of 2: 0.550, 0.560"
    assert flags["denoising (baseline)", "finetuned"]["ITM AUC on the ITC top-k < 0.6"] == "no (0 of 3)"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_regenerating_from_the_exports_alone_is_byte_identical(study, tmp_path) -> None:
    """The workspace's own reports/ and the HEAD commit never enter an --only-runs report, and a
    new commit (another HEAD sha) changes no byte of it."""
    (tmp_path / "reports/evaluate").mkdir(parents=True)
    (tmp_path / "reports/evaluate/metrics.json").write_text(json.dumps({"finetune": {"r_mean": 99.87}}))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "study")

    command = ["--only-runs", "--runs", "runs", "--reports", "reports"]
    _report(*command)
    first = (tmp_path / "reports/results.md").read_bytes()
    (tmp_path / "later.txt").write_text("a later commit")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "later")
    shutil.rmtree(tmp_path / "reports/figures")
    _report(*command)
    assert (tmp_path / "reports/results.md").read_bytes() == first
    text = first.decode()
    assert "99.87" not in text and "HEAD (" not in text
    assert sorted(r["run"] for r in _table(text, "## Provenance")) == sorted(p.name for p in Path("runs").iterdir())
    assert str(tmp_path) not in text
    assert "`dmp report --only-runs --runs runs --params params.yaml --reports reports`" in text
    assert sorted(p.name for p in (tmp_path / "reports/figures").iterdir()) == [
        "ablations.png", "pretrain_losses.png", "scaling_pretrain_data_fraction.png"]


def test_exported_runs_merge_with_the_runs_they_repeat(study, tmp_path) -> None:
    """Without --only-runs the exports join the workspace: the same run (params, seed, results) is
    one row with both names; an export of the same params and seed with other results is left
    out, noted, so that no seed counts twice."""
    from dmp_core.config import load_config
    from dmp_core.report import merge_duplicates
    from orchestration.runs import collect

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "objective": {"variant": "mamo"}}))
    shutil.copytree(tmp_path / "runs/scale-mamo-f100-s1/reports", tmp_path / "reports")
    twin = tmp_path / "other/scale-mamo-f100-s1-rerun"
    shutil.copytree(tmp_path / "runs/scale-mamo-f100-s1", twin)
    details = json.loads((twin / "reports/evaluate/details.json").read_text())
    details["models"]["finetune"]["rerank"]["r_mean"] += 1.0
    (twin / "reports/evaluate/details.json").write_text(json.dumps(details))

    inputs = collect(load_config(Path("params.yaml")), use_dvc=False, use_mlflow=False,
                     runs_dirs=(Path("runs"), Path("other")))
    names = [r.names for r in merge_duplicates(inputs.runs)]
    assert ["workspace", "scale-mamo-f100-s1"] in names and len(names) == len(study)
    assert not any("rerun" in n for run in names for n in run)
    assert any(n.startswith("Exported run other/scale-mamo-f100-s1-rerun has the params and seed of workspace")
               for n in inputs.notes)
    assert [r.names[0] for r in inputs.runs[1:4]] == ["scale-denoising-f025-s0", "scale-denoising-f025-s1",
                                                      "scale-denoising-f025-s2"]  # sorted by name


def test_only_runs_needs_runs_and_runs_needs_exports(study, tmp_path) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["report", "--only-runs"])
    assert result.exit_code == 1 and "give the exported runs with --runs DIR" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", "--only-runs", "--runs", "empty"])
    assert result.exit_code == 1 and "report --runs empty: no exported run there" in result.output


def test_image_counts_without_a_preprocessing_summary_come_from_the_synthetic_params() -> None:
    """Older exports have no reports/preprocess/summary.json: the synthetic set's size is a param."""
    from dmp_core.report import Run
    from dmp_core.report.scaling import training_images

    params = {"data.name": "synthetic", "data.synthetic.n_train": 8000, "data.fraction": 0.5,
              "pretrain.data_fraction": 0.3}
    run = Run(names=["r"], params=params)
    assert (training_images(run, "pretrain"), training_images(run, "finetune")) == (1200, 4000)
    assert training_images(Run(names=["r"], params={**params, "data.name": "flickr8k"}), "pretrain") is None
    photos = Run(names=["r"], params={**params, "data.name": "flickr8k"}, split_images={"train": 753})
    assert (training_images(photos, "pretrain"), training_images(photos, "finetune")) == (226, 753)


def test_the_rerank_gain_table_matches_a_brute_force_reference(study, tmp_path) -> None:
    """Re-ranked − ITC only per method, point and model: the per-seed gains, their mean with the t
    interval, and whether re-ranking held ITC on every seed."""
    _report("--only-runs", "--runs", "runs", "--reports", "out")
    rows = _table((tmp_path / "out/results.md").read_text(), "### Does re-ranking pay?")
    assert len(rows) == 2 * 2 * 2  # method x fraction x model
    for row in rows:
        variant = "denoising" if row["Method"].startswith("denoising") else "mamo"
        fraction = float(row["Method"].rsplit(" ", 1)[1])
        model = {"finetuned": "finetune", "zero-shot": "pretrain"}[row["Model"]]
        gains = [_r_mean(study, variant, fraction, s, model, "rerank") - _r_mean(study, variant, fraction, s, model, "itc")
                 for s in range(3) if (variant, fraction, s) in study]
        mean, sd, n = float(np.mean(gains)), float(np.std(gains, ddof=1)), len(gains)
        half = t.ppf(0.975, n - 1) * sd / np.sqrt(n)
        assert row["re-ranked − ITC only [95% t interval]"] == \
            f"{_signed(mean)} [{_signed(mean - half)}, {_signed(mean + half)}]", row
        assert row["per seed"] == ", ".join(_signed(g) for g in gains) and row["Seeds"] == str(n)
        below = sum(g < 0 for g in gains)
        assert row[">= ITC on every seed"] == ("yes" if not below else f"no ({below} below)")


def test_the_report_names_the_planned_points_not_run_yet(tmp_path, monkeypatch) -> None:
    """A study that spans sessions: only fraction 1 is exported (both methods, 3 seeds), its
    plan.json (what ``dmp study scaling`` records) has fractions 0.25 and 1. The report names
    fraction 0.25 of both methods as not run, and not fraction 1's points; byte for byte the
    same twice; complete once every planned run is there."""
    from dmp_core.config import load_config
    from orchestration.study import scaling_plan, write_plan

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"bootstrap_samples": 200}}))
    for variant in QUALITY:
        for seed in range(3):
            _write_export(tmp_path / "runs", variant, 1.0, seed)
    write_plan(tmp_path / "runs", scaling_plan(3, [0.25, 1.0], ["denoising", "mamo"],
                                               base=load_config(tmp_path / "params.yaml")))

    command = ["--only-runs", "--runs", "runs", "--reports", "out"]
    _report(*command)
    first = (tmp_path / "out/results.md").read_bytes()
    shutil.rmtree(tmp_path / "out")
    _report(*command)
    assert (tmp_path / "out/results.md").read_bytes() == first
    text = first.decode()
    missing = ("denoising at pretraining fraction 0.25: seeds 0, 1, 2 not run; "
               "MAMO at pretraining fraction 0.25: seeds 0, 1, 2 not run")
    top = text.split("\n## Main results")[0]
    assert (f"Partial (a claim needs >= 3 seeds of each point, and the study's plan has runs not run yet): "
            f"{missing}."
            in top), top
    assert f"(run `dmp study scaling`). Planned by the study and not run yet: {missing}." in text
    assert "fraction 1:" not in text and "- Planned runs: 12 in runs/plan.json" in text

    # one method's fraction 0.25 in part: a scaling section, whose partial text names both points
    for seed in (0, 1):
        _write_export(tmp_path / "runs", "denoising", 0.25, seed)
    _report(*command)
    scaling = (tmp_path / "out/results.md").read_text().split("\n## Data scaling: pretraining fraction")[1]
    assert ("Partial study: these points have fewer seeds than a claim needs (>= 3) or than the other points, or "
            "runs the study planned that have not run yet: denoising at pretraining fraction 0.25: 2 seeds (0, 1; "
            "missing 2); MAMO at pretraining fraction 0.25: seeds 0, 1, 2 not run.") in scaling
    # every planned run finished: complete
    _write_export(tmp_path / "runs", "denoising", 0.25, 2)
    for seed in range(3):
        _write_export(tmp_path / "runs", "mamo", 0.25, seed)
    _report(*command)
    text = (tmp_path / "out/results.md").read_text()
    assert "Complete: every run the study planned has finished and every point has >= 3 seeds." in text
    assert ("Complete: every run the study planned at these settings has finished and every point has the seeds "
            "0, 1, 2.") in text
    assert "seeds 0, 1, 2 not run" not in text and "Partial" not in text
