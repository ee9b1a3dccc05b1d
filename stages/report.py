"""``dmp report``: reports/results.md and reports/figures/ from the DVC experiment table.

This module does the DVC and MLflow part (which experiments exist, their params,
metrics, run ids and loss histories); ``dmp_core.report`` turns that plain data
into tables, plots and the gallery.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from stages._common import ParamsOpt, echo, guarded, load

STAGES = ("pretrain", "finetune")


# ------------------------------------------------------------------ the workspace
def workspace_record(cfg, reports: Path) -> dict[str, Any]:
    """The current run, straight from params and reports/ (no DVC needed)."""
    from dmp_core.config import flatten
    from dmp_core.report import normalise_value
    from dmp_core.tracking import read_run_json

    metrics: dict[str, float] = {}
    metrics_path = reports / "evaluate" / "metrics.json"
    if metrics_path.is_file():
        for key, value in flatten(json.loads(metrics_path.read_text())).items():
            if isinstance(value, (int, float)):
                metrics[key] = float(value)
    run_ids = {}
    for stage in STAGES:
        run = read_run_json(reports / stage / "run.json") or {}
        if run.get("run_id"):
            run_ids[stage] = run["run_id"]
    params = {k: normalise_value(v) for k, v in flatten(cfg).items()}
    return {"name": "workspace", "rev": "workspace", "params": params, "metrics": metrics,
            "run_ids": run_ids, "workspace": True}


# ------------------------------------------------------------------ experiments
def experiment_rows(num: int = -1) -> tuple[list[dict], Optional[str]]:
    """``dvc.api.exp_show`` rows, or ([], why) when this is not a usable DVC repo."""
    try:
        import dvc.api

        return dvc.api.exp_show(num=num), None
    except Exception as err:  # noqa: BLE001  (no git/DVC repo, no commit, ...): report the workspace only
        return [], f"DVC experiments not read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def _mlflow_client(cfg):
    """A client on the project's store, or None when its SQLite file does not exist (nothing to read)."""
    from dmp_core.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None  # opening it would create an empty store
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def find_run_ids(client, exp_name: str) -> dict[str, str]:
    """MLflow run ids per stage of one DVC experiment (tag ``dvc.exp_name``), newest first wins."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return {}
    runs = client.search_runs(exps, filter_string=f"tags.`dvc.exp_name` = '{exp_name}'", order_by=["attributes.start_time DESC"])
    out: dict[str, str] = {}
    for run in runs:
        stage = run.data.tags.get("dmp.stage")
        if stage and stage not in out:
            out[stage] = run.info.run_id
    return out


def mlflow_history(client, run_id: str):
    """Loss-term metric histories of one run as a DataFrame with a ``step`` column."""
    import pandas as pd

    run = client.get_run(run_id)
    series = {}
    for key in run.data.metrics:
        if "loss" not in key:
            continue
        hist = client.get_metric_history(run_id, key)
        series[key] = pd.Series({m.step: m.value for m in hist})
    if not series:
        return None
    frame = pd.DataFrame(series).sort_index()
    frame.index.name = "step"
    return frame.reset_index()


def collect(cfg, reports: Path, num: int = -1, use_dvc: bool = True, use_mlflow: bool = True):
    """Records, loss histories and notes for :func:`dmp_core.report.build_report`."""
    import pandas as pd

    from dmp_core.report import records_from_exp_rows

    notes: list[str] = []
    records = [workspace_record(cfg, reports)]
    if use_dvc:
        rows, why = experiment_rows(num)
        if why:
            notes.append(why + "; only the workspace is reported.")
        records += [r for r in records_from_exp_rows(rows) if not r["workspace"]]

    histories: dict[str, Any] = {}
    history_csv = reports / "pretrain" / "history.csv"
    if history_csv.is_file():
        histories["workspace"] = pd.read_csv(history_csv)

    experiments = [r for r in records if not r["workspace"]]
    if experiments and use_mlflow:
        try:
            client = _mlflow_client(cfg)
            if client is None:
                notes.append("No MLflow store found; experiment run ids and loss curves omitted.")
                experiments = []
            for rec in experiments:
                if "pretrain" not in rec["run_ids"]:
                    rec["run_ids"].update(find_run_ids(client, rec["name"]))
                if rec["run_ids"].get("pretrain"):
                    history = mlflow_history(client, rec["run_ids"]["pretrain"])
                    if history is not None:
                        histories[rec["name"]] = history
        except Exception as err:  # noqa: BLE001  (store unreachable): tables still come from DVC
            notes.append(f"MLflow store not read ({type(err).__name__}); experiment run ids and curves omitted.")
    return records, histories, notes


def write_report(cfg, reports: Path = Path("reports"), prepared: Path = Path("data/prepared"), *,
                 num: int = -1, experiments: bool = True) -> Path:
    """Collect everything and write reports/results.md (+ figures); return its path."""
    from dmp_core.report import build_report, load_gallery

    records, histories, notes = collect(cfg, reports, num=num, use_dvc=experiments)
    scores = reports / "evaluate" / "scores.npz"
    split_dir = prepared / cfg.eval.split
    gallery = load_gallery(scores, split_dir) if scores.is_file() and (split_dir / "images.npy").is_file() else None
    path = build_report(records, reports, histories=histories, gallery=gallery,
                        gallery_queries=cfg.report.gallery_queries,
                        include_seed_numbers=cfg.report.include_seed_numbers, notes=notes)
    echo(f"report: {path} ({len(records)} runs, {len(histories)} loss histories)")
    return path


@guarded
def report_cmd(
    params: ParamsOpt = Path("params.yaml"),
    reports: Annotated[Path, typer.Option(help="reports folder (inputs and results.md)")] = Path("reports"),
    prepared: Annotated[Path, typer.Option(help="prepared data folder (gallery images and captions)")] = Path("data/prepared"),
    num: Annotated[int, typer.Option(help="commits whose experiments are read (-1: all)")] = -1,
    experiments: Annotated[bool, typer.Option(help="read DVC experiments (off: workspace only)")] = True,
) -> None:
    """Write reports/results.md and reports/figures/*.png (tables, curves, retrieval gallery)."""
    write_report(load(params), reports, prepared, num=num, experiments=experiments)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
