"""``dmp pretrain``: the variant's objectives on the training split.

Writes ``models/pretrain/model.safetensors`` (best val ITC recall), resume state in
``models/pretrain/checkpoints/`` and ``reports/pretrain/{metrics.json, history.csv,
val_history.csv, run.json}``. Run it again after a kill and it resumes. Under
``torchrun --nproc_per_node=N -m stages pretrain``, or with ``DMP_NPROC_PER_NODE=N`` set
(it relaunches itself so), it trains with DDP."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOpt, echo, guarded, load, relaunch_under_torchrun

PreparedOpt = Annotated[Path, typer.Option(help="prepared data folder")]
TargetsOpt = Annotated[Path, typer.Option(help="precomputed MIM targets folder")]
ModelsOpt = Annotated[Path, typer.Option("--models", help="folder for <stage>/model.safetensors and checkpoints")]
ReportsOpt = Annotated[Path, typer.Option(help="reports folder (<stage>/ is written)")]


def summary(stage: str, metrics: dict) -> str:
    if not metrics:  # ranks other than 0
        return ""
    return (f"{stage}: {metrics['steps']} steps, best val r_mean {metrics['val_r_mean_best']:.2f} at step "
            f"{metrics['best_step']}, {metrics['pairs_per_s']:.0f} pairs/s, {metrics['wall_time_s']:.1f} s")


@guarded
def pretrain_cmd(
    params: ParamsOpt = Path("params.yaml"),
    prepared: PreparedOpt = Path("data/prepared"),
    targets: TargetsOpt = Path("data/targets"),
    models_dir: ModelsOpt = Path("models"),
    reports: ReportsOpt = Path("reports"),
) -> None:
    """Pretrain (resumes from models/pretrain/checkpoints when present)."""
    relaunch_under_torchrun()  # DMP_NPROC_PER_NODE=N: N processes (DDP) on this machine
    from dmp_core.training.loop import run_training

    cfg = load(params)
    metrics = run_training(cfg, "pretrain", prepared_dir=prepared, targets_dir=targets,
                           out_dir=models_dir / "pretrain", reports_dir=reports / "pretrain")
    if metrics:
        echo(summary("pretrain", metrics))


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)
