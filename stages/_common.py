"""What every stage command shares: the ``--params`` option, params loading, and
turning library errors into one line on stderr with a non-zero exit."""
from __future__ import annotations

import functools
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
