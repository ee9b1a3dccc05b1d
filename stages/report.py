"""``dmp report``: reports/results.md and reports/figures/ from every finished run
(:mod:`orchestration.runs` gathers the runs; :mod:`dmp_core.report` writes the report)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    export_runs: Annotated[Optional[Path], typer.Option(help="also copy every experiment's metrics, ranks and "
                                                        "histories to DIR/<name>/ (orchestration/export.py)")] = None,
) -> None:
    """Write reports/results.md and reports/figures/*.png (tables, intervals, verdict, curves, gallery)."""
    write_report(load(params), reports, prepared, params_path=params, num=num, experiments=experiments)
    if export_runs is not None:
        from orchestration.export import export_experiments

        names = export_experiments(export_runs, num=num)
        print(f"report: exported {len(names)} experiments to {export_runs}/: {', '.join(names) or '-'}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
