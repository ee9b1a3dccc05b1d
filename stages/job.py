"""``dmp job run|warm-up``: one experiment of a published study, in its own clone, pushed to
the study's remotes (:mod:`orchestration.jobs`). What a Ray task, an sbatch script or a
shell loop runs; a failed job is resubmitted with the same command."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestration.jobs import read_spec, run_job, warm_up
from stages._common import guarded

job_app = typer.Typer(help="Run one experiment of a published study (any machine).", no_args_is_help=True)
RemoteOpt = Annotated[str, typer.Option("--git-remote", envvar="DMP_GIT_REMOTE",
                                        help="the study's git remote (URL or path)")]
WorkdirOpt = Annotated[Path, typer.Option(help="where the job clones (removed after a success unless --keep)")]


@job_app.command("run")
@guarded
def run_cmd(study: Annotated[str, typer.Argument(help="study name (refs/dmp/studies/<name>)")],
            exp: Annotated[str, typer.Argument(help="experiment name of the study's plan")],
            git_remote: RemoteOpt, workdir: WorkdirOpt = Path(".dvc/tmp/jobs"),
            keep: Annotated[bool, typer.Option("--keep", help="keep the clone after a success")] = False) -> None:
    """Clone at the study's commit, restore finished stages, `dvc exp run`, push the experiment."""
    work = workdir.resolve()
    result = run_job(read_spec(git_remote, study, work), exp, work, keep=keep)
    print(f"job {exp}: {'ok' if result.ok else 'FAILED'} ({result.log})")
    if not result.ok:
        raise typer.Exit(1)


@job_app.command("warm-up")
@guarded
def warm_up_cmd(study: Annotated[str, typer.Argument(help="study name")], git_remote: RemoteOpt,
                workdir: WorkdirOpt = Path(".dvc/tmp/jobs")) -> None:
    """Run the study's data stages once and push them with the run cache (before any fan-out)."""
    work = workdir.resolve()
    warm_up(read_spec(git_remote, study, work), work)
    print(f"job warm-up: data stages of {study} pushed")


def register(app: typer.Typer) -> None:
    app.add_typer(job_app, name="job")
