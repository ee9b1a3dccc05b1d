"""What every stage command shares: the ``--params`` option, params loading, and
turning library errors into one line on stderr with a non-zero exit."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from dmp_core.config import Config, load_config
from dmp_core.errors import DmpError
from orchestration.repo import echo  # noqa: F401  (re-exported for the stage modules)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML)")]


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage body; a DmpError becomes 'dmp <stage>: error: <one line>' and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DmpError as err:
            name = fn.__name__.replace("_cmd", "").replace("_", "-")
            typer.echo(f"dmp {name}: error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def load(params: Path) -> Config:
    return load_config(params)


NPROC_ENV = "DMP_NPROC_PER_NODE"  # set by `dmp study --gpus-per-exp N` (docs/CLUSTER.md)


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """``argv`` (a stage command) again under torchrun with ``nproc`` processes. ``--standalone``
    is a c10d rendezvous on ``localhost:0``, a free port: two jobs on one machine never
    collide on torchrun's default port 29500."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "stages", *argv]


def relaunch_under_torchrun() -> None:
    """With ``DMP_NPROC_PER_NODE=N`` (N > 1) and not yet under torchrun, replace this process
    by the same command under torchrun; otherwise return. The training stages call it first."""
    nproc = int(os.environ.get(NPROC_ENV) or 1)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        echo(f"{sys.argv[1] if len(sys.argv) > 1 else 'stage'}: {NPROC_ENV}={nproc}: relaunching under torchrun")
        os.execv(sys.executable, torchrun_argv(sys.argv[1:], nproc))
