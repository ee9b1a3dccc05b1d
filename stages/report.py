"""``dmp report``: reports/results.md and reports/figures/ from every finished run
(:mod:`orchestration.runs` gathers the runs; :mod:`dmp_core.report` writes the report)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestration.runs import write_report
from stages._common import ParamsOpt, guarded, load


@guarded
def report_cmd(
    params: ParamsOpt = Path("params.yaml"),
    reports: Annotated[Path, typer.Option(help="reports folder (inputs and results.md)")] = Path("reports"),
    prepared: Annotated[Path, typer.Option(help="prepared data folder (gallery images and captions)")] = Path("data/prepared"),
    num: Annotated[int, typer.Option(help="commits whose experiments are read (-1: all)")] = -1,
    experiments: Annotated[bool, typer.Option(help="read DVC experiments (off: workspace and HEAD only)")] = True,
) -> None:
    """Write reports/results.md and reports/figures/*.png (tables, intervals, verdict, curves, gallery)."""
    write_report(load(params), reports, prepared, params_path=params, num=num, experiments=experiments)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
