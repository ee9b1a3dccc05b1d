"""``dmp finetune``: ITC + ITM retrieval training from the pretrained weights.

Reads ``models/pretrain/model.safetensors`` and ``reports/pretrain/run.json`` (the
pretrain MLflow run id becomes the ``dmp.upstream_run_id`` tag); writes the same files
as ``dmp pretrain`` under ``models/finetune`` and ``reports/finetune``."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import ParamsOpt, echo, guarded, load, relaunch_under_torchrun
from stages.pretrain import ModelsOpt, PreparedOpt, ReportsOpt, summary


@guarded
def finetune_cmd(
    params: ParamsOpt = Path("params.yaml"),
    prepared: PreparedOpt = Path("data/prepared"),
    models_dir: ModelsOpt = Path("models"),
    reports: ReportsOpt = Path("reports"),
) -> None:
    """Finetune for retrieval (resumes from models/finetune/checkpoints when present)."""
    relaunch_under_torchrun()  # DMP_NPROC_PER_NODE=N: N processes (DDP) on this machine
    from dmp_core.training.loop import run_training

    cfg = load(params)
    metrics = run_training(cfg, "finetune", prepared_dir=prepared, targets_dir=None,
                           out_dir=models_dir / "finetune", reports_dir=reports / "finetune",
                           init_weights=models_dir / "pretrain" / "model.safetensors",
                           upstream_run=reports / "pretrain" / "run.json")
    if metrics:
        echo(summary("finetune", metrics))


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_cmd)
