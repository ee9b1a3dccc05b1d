"""``dmp pipeline`` (what ``make run`` calls): the whole pipeline on the current params.

1. ``dvc repro``: all seven stages in the workspace (the default variant);
2. ``dvc exp run --temp -n <name> -S objective.variant=<other>``: the other variant
   as a DVC experiment in a temporary copy (skipped when an experiment of that name
   already exists for the current commit, unless ``--rerun``);
3. ``dvc repro report``: the report again, now that the experiment table holds both.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOpt, echo, guarded, load


def _dvc(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    echo("$ dvc " + " ".join(args))
    return subprocess.run(cmd, check=False)


def _existing_experiments() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        capture_output=True, text=True, check=False,
    )
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _run_or_die(*args: str) -> None:
    if _dvc(*args).returncode != 0:
        echo(f"dmp pipeline: error: 'dvc {' '.join(args)}' failed (see its output above)")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    @guarded
    def pipeline_cmd(
        params: ParamsOpt = Path("params.yaml"),
        compare: Annotated[bool, typer.Option(help="also run the other variant as a DVC experiment")] = True,
        rerun: Annotated[bool, typer.Option(help="re-run the comparison experiment even if it exists")] = False,
    ) -> None:
        """Run all stages (dvc repro), the other variant as an experiment, then the report."""
        cfg = load(params)
        t0 = time.time()
        _run_or_die("repro")
        if compare:
            other = "mamo" if cfg.objective.variant == "denoising" else "denoising"
            name = f"{other}-default"
            exists = name in _existing_experiments()
            if exists and not rerun:
                echo(f"experiment '{name}' exists for this commit: kept (use --rerun to run it again)")
            else:
                if exists:
                    _run_or_die("exp", "remove", name)
                _run_or_die("exp", "run", "--temp", "-n", name, "-S", f"objective.variant={other}")
            _run_or_die("repro", "report")  # always_changed: re-reads the experiment table
        echo(f"dmp pipeline: done in {time.time() - t0:.0f} s; read reports/results.md")
