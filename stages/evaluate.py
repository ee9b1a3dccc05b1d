"""``dmp evaluate``: retrieval after pretraining (zero-shot) and after finetuning."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOpt, echo, guarded, load


@guarded
def evaluate_cmd(
    params: ParamsOpt = Path("params.yaml"),
    prepared: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    models_dir: Annotated[Path, typer.Option("--models", help="folder with <stage>/model.safetensors")] = Path("models"),
    reports: Annotated[Path, typer.Option(help="reports folder (run.json in, evaluate/ out)")] = Path("reports"),
    stage: Annotated[list[str], typer.Option(help="models to evaluate, in order (the last one fills scores.npz)")] = ["pretrain", "finetune"],
) -> None:
    """ALBEF-protocol retrieval (ITC top-k, ITM re-rank) -> reports/evaluate/{metrics.json,scores.npz}."""
    from dmp_core.evaluation.evaluate import run_evaluate, summary_line

    cfg = load(params)
    models = {name: models_dir / name / "model.safetensors" for name in stage}
    metrics = run_evaluate(cfg, prepared, models, reports)
    for line in summary_line(metrics):
        echo(line)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
