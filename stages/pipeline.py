"""``dmp pipeline`` (what ``make run`` calls): ``dvc repro``, the result saved as
``<variant>-default``, the other variant as a DVC experiment, the report
(:mod:`orchestration.pipeline` runs the steps)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestration.pipeline import run_pipeline
from stages._common import ParamsOpt, guarded, load


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    @guarded
    def pipeline_cmd(
        params: ParamsOpt = Path("params.yaml"),
        compare: Annotated[bool, typer.Option(help="save the baseline and run the other variant as DVC experiments")] = True,
        rerun: Annotated[bool, typer.Option(help="re-run the other variant's experiment even if it exists")] = False,
    ) -> None:
        """dvc repro, save the result as <variant>-default, the other variant as an experiment, the report."""
        code = run_pipeline(params, load(params), compare=compare, rerun=rerun)
        if code:
            raise typer.Exit(code)
