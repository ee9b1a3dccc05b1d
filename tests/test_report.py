"""The report on synthetic experiment records: rows, means and stds, seed rows
labelled, plots written and linked, and a sentence for every missing plot."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from dmp_core.config import flatten
from dmp_core.report import (
    GalleryData,
    ablation_table,
    annotate,
    build_report,
    loss_columns,
    main_table,
    normalise_value,
    records_from_exp_rows,
    scaling_table,
)

BASE = {k: normalise_value(v) for k, v in flatten(tiny_config()).items()}
RECALL_KEYS = [f"{d}_r{k}" for d in ("tr", "ir") for k in (1, 5, 10)]


def _metrics(base: float) -> dict[str, float]:
    out = {}
    for stage, shift in (("finetune", 0.0), ("pretrain", -10.0)):
        for i, key in enumerate(RECALL_KEYS):
            out[f"{stage}.itm_{key}"] = base + shift + 3 * (i % 3)
            out[f"{stage}.itc_{key}"] = base + shift - 1 + 3 * (i % 3)
        out[f"{stage}.itm_r_mean"] = base + shift + 3
        out[f"{stage}.itc_r_mean"] = base + shift + 2
    return out


def _record(name: str, base: float, workspace: bool = False, **params) -> dict:
    merged = dict(BASE)
    merged.update({k.replace("__", "."): v for k, v in params.items()})
    return {"name": name, "params": merged, "metrics": _metrics(base), "workspace": workspace,
            "run_ids": {"pretrain": f"run-pre-{name}", "finetune": f"run-ft-{name}"}}


@pytest.fixture
def records() -> list[dict]:
    recs = [_record("workspace", 40.0, workspace=True)]
    recs += [_record(f"abl-denoise-hog-s{s}", 40.0 + 2 * s, seed=s) for s in (1, 2)]
    recs += [_record(f"abl-mamo-s{s}", 30.0 + 4 * s, seed=s, objective__variant="mamo") for s in (0, 1, 2)]
    recs += [_record("abl-pixel-s0", 35.0, objective__mim_target="pixel")]
    for variant, base in (("denoising", 10.0), ("mamo", 8.0)):
        for fraction in (0.1, 0.5):
            recs += [_record(f"scale-{variant}-{fraction}-s{s}", base + 20 * fraction + s, seed=s,
                             objective__variant=variant, data__fraction=fraction) for s in (0, 1)]
    return recs


def _cell(table: pd.DataFrame, key_col: str, key, col: str) -> str:
    rows = table[table[key_col] == key]
    assert len(rows) == 1, (key, table[key_col].tolist())
    return str(rows.iloc[0][col])


def test_ablation_table_groups_seeds_with_mean_and_std(records) -> None:
    table = ablation_table(annotate(records))
    assert set(table["Method"]) == {"denoising", "mamo", "denoising (mim_target=pixel)"}
    # mamo: three seeds with IR R@1 = 30, 34, 38 (+3 for ir_r1's position in RECALL_KEYS)
    values = [30.0 + 4 * s + 3 * (3 % 3) for s in (0, 1, 2)]
    want = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    assert _cell(table, "Method", "mamo", "IR R@1") == want
    assert _cell(table, "Method", "mamo", "seeds") == "3"
    # the workspace (seed 0) and two seeded experiments form the denoising group
    assert _cell(table, "Method", "denoising", "seeds") == "3"
    assert _cell(table, "Method", "denoising (mim_target=pixel)", "TR R@1") == "35.0"  # one run: no std
    assert "scale-" not in " ".join(table["runs"])  # other data fractions stay out of the ablations


def test_scaling_table_rows_per_variant_and_fraction(records) -> None:
    table = scaling_table(annotate(records))
    pairs = set(zip(table["Variant"], table["data.fraction"]))
    assert pairs == {(v, f) for v in ("denoising", "mamo") for f in (0.1, 0.5, 1)}
    mamo_half = [8.0 + 10.0 + s for s in (0, 1)]
    row = table[(table["Variant"] == "mamo") & (table["data.fraction"] == 0.5)].iloc[0]
    assert row["TR R@1"] == f"{statistics.mean(mamo_half):.1f} ± {statistics.stdev(mamo_half):.1f}"


def test_main_table_has_our_rows_and_labelled_seed_rows(records) -> None:
    table = main_table(annotate(records), include_seed_numbers=True)
    methods = table["Method"].tolist()
    assert "denoising (ours, finetuned)" in methods and "mamo (ours, zero-shot)" in methods
    reported = table[table["Method"].str.contains("reported")]
    assert len(reported) == 3 and set(reported["Dataset"]) == {"flickr30k", "coco"}
    seed = reported[reported["Method"].str.contains("seed")].iloc[0]
    assert (seed["IR R@1"], seed["TR R@10"]) == ("55.56", "94.3")
    assert not main_table(annotate(records), include_seed_numbers=False)["Method"].str.contains("reported").any()


def test_build_report_writes_linked_plots_and_gallery(records, tmp_path) -> None:
    steps = np.arange(0, 50, 5)
    histories = {
        "workspace": pd.DataFrame({"step": steps, "loss": 5 - steps / 20, "loss_mim": 1 - steps / 100, "val/loss": 9.0}),
        "abl-mamo-s0": pd.DataFrame({"step": steps, "train/loss": 6 - steps / 20, "train/loss_mrm": 0.5}),
    }
    rng = np.random.default_rng(0)
    gallery = GalleryData(
        images=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
        captions=[f"caption {i}" for i in range(12)],
        txt2img=np.repeat(np.arange(6), 2),
        scores={m: (rng.standard_normal((6, 12)), rng.standard_normal((12, 6))) for m in ("pretrain", "finetune")},
    )
    md_path = build_report(records, tmp_path, histories=histories, gallery=gallery, gallery_queries=2)
    text = md_path.read_text()
    for name in ("ablations.png", "scaling.png", "pretrain_losses.png", "gallery_pretrain.png", "gallery_finetune.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
        assert f"(figures/{name})" in text, name
    assert "No " not in text.split("## Provenance")[0]  # nothing reported missing
    assert "run-ft-abl-mamo-s1" in text and "objective.variant=mamo" in text  # provenance
    assert "reported" in text and "not a comparison of equals" in text


def test_missing_data_gives_sentences_not_empty_plots(tmp_path) -> None:
    only = [_record("workspace", 40.0, workspace=True)]
    text = build_report(only, tmp_path, histories={}, gallery=None).read_text()
    assert "No ablation chart" in text and "No data-scaling plot" in text
    assert "No loss curves" in text and "No gallery" in text
    assert not list((tmp_path / "figures").glob("*.png"))
    nothing = build_report([], tmp_path / "empty").read_text()
    assert "No finished runs" in nothing


def test_loss_columns_ignore_validation_curves() -> None:
    frame = pd.DataFrame(columns=["step", "loss", "loss_itc", "train/loss_mim", "val/loss", "lr"])
    assert loss_columns(frame) == {"loss": "loss", "loss_itc": "loss_itc", "train/loss_mim": "loss_mim"}


def test_records_from_exp_show_rows() -> None:
    """Rows shaped like dvc.api.exp_show(): file-prefixed names, strings for bools/None."""
    rows = [
        {"Experiment": None, "rev": "workspace", "typ": "baseline", "State": None, "seed": 0.0,
         "objective.variant": "denoising", "finetune.itm_ir_r1": 40.0},
        {"Experiment": None, "rev": "a1b2c3d", "typ": "baseline", "seed": 0.0, "finetune.itm_ir_r1": 39.0},
        {"Experiment": "abl-novic-s1", "rev": "e4f5a6b", "typ": "branch_commit", "State": None, "seed": 1.0,
         "objective.variant": "denoising", "objective.vicreg": "False", "objective.mim_target": "None",
         "params.yaml:pretrain.lr": 0.0005, "reports/evaluate/metrics.json:finetune.itm_ir_r1": 33.5,
         "reports/pretrain/metrics.json:pretrain.lr": 0.0001, "finetune.itc_tr_r5": "!"},
        {"Experiment": "abl-queued", "rev": "ffffff0", "typ": "branch_base", "State": "Queued", "seed": 2.0},
    ]
    recs = records_from_exp_rows(rows)
    assert [r["name"] for r in recs] == ["workspace", "abl-novic-s1"]
    exp = recs[1]
    assert exp["params"]["objective.vicreg"] is False and exp["params"]["objective.mim_target"] is None
    assert exp["params"]["pretrain.lr"] == 0.0005 and exp["params"]["seed"] == 1
    assert exp["metrics"] == {"finetune.itm_ir_r1": 33.5}  # "!" (an error) is dropped, not a number


def test_report_cli_on_a_workspace_without_dvc(tmp_path, monkeypatch) -> None:
    """``dmp report`` outside a DVC repo: the workspace only, said in the report."""
    from typer.testing import CliRunner

    from stages.cli import app

    cfg = tiny_config()
    (tmp_path / "params.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    (tmp_path / "reports/evaluate").mkdir(parents=True)
    (tmp_path / "reports/evaluate/metrics.json").write_text(json.dumps({"finetune": {"itm_ir_r1": 12.5}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    result = CliRunner().invoke(app, ["report", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "reports/results.md").read_text()
    assert "12.5" in text and "only the workspace is reported" in text


def test_experiment_run_ids_and_curves_come_from_mlflow(tmp_path) -> None:
    """An experiment's run ids are found by its ``dvc.exp_name`` tag, its curves by metric history."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from stages.report import find_run_ids, mlflow_history

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
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
