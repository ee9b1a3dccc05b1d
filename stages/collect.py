"""``dmp study collect`` and where a study runs (the ``dmp study`` options before the kind):
this machine's DVC queue, one worker per GPU, a Ray cluster, or printed jobs
(:mod:`orchestration.cluster`; docs/CLUSTER.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestration.cluster import ClusterSettings, collect_and_report
from stages._common import ParamsOpt, guarded
from stages.study import study_app


@study_app.callback()
def where(ctx: typer.Context,
          engine: Annotated[str, typer.Option(help="queue: this machine's DVC queue; ray: one Ray task per "
                                                   "experiment; jobs: print one `dmp job run` per experiment")] = "queue",
          gpus: Annotated[str, typer.Option(help="queue: one worker pinned to each GPU id, e.g. 0,1,2,3")] = "",
          gpus_per_exp: Annotated[float, typer.Option(help="GPUs per experiment (> 1: DDP under torchrun)")] = 0.0,
          address: Annotated[Optional[str], typer.Option(help="ray: cluster address (default: a local one)")] = None,
          local_gpus: Annotated[Optional[int], typer.Option(help="ray: GPU slots of the local cluster")] = None,
          git_remote: Annotated[Optional[str], typer.Option(envvar="DMP_GIT_REMOTE", help="shared git remote")] = None,
          dvc_remote: Annotated[Optional[str], typer.Option(envvar="DMP_DVC_REMOTE", help="shared DVC remote")] = None,
          tracking_uri: Annotated[Optional[str], typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow URI")] = None,
          workdir: Annotated[Path, typer.Option(help="where jobs clone")] = Path(".dvc/tmp/jobs"),
          name: Annotated[Optional[str], typer.Option(help="study name (default <kind>-<commit>)")] = None,
          warm_up: Annotated[bool, typer.Option(help="run the data stages once before the fan-out")] = True) -> None:
    """Where the study runs (docs/CLUSTER.md): options before the study kind."""
    ctx.obj = ClusterSettings(engine, [g for g in gpus.split(",") if g.strip()], gpus_per_exp, address, local_gpus,
                              git_remote, dvc_remote, tracking_uri, workdir, name, warm_up)

@study_app.command("collect")
@guarded
def collect_cmd(name: Annotated[str, typer.Argument(help="study name (refs/dmp/studies/<name>)")],
                git_remote: Annotated[str, typer.Option(envvar="DMP_GIT_REMOTE", help="the study's git remote")],
                params: ParamsOpt = Path("params.yaml")) -> None:
    """Pull the study's experiments from the shared remotes and write the report (partial: names the missing)."""
    missing = collect_and_report(name, git_remote, params)
    print(f"study {name}: report written" + (f"; PARTIAL, missing: {', '.join(missing)}" if missing else ""))


def register(app: typer.Typer) -> None:
    """Nothing to add to the root: the command and the options belong to ``dmp study``."""
