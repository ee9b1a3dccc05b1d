"""``dmp params doc|recipe``: docs/PARAMS.md from the schema (:mod:`dmp_core.params_doc`),
and a named recipe as ``dvc exp run`` arguments or applied to the params file."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmp_core.config import apply_dotted, config_from_dict, load_config, load_recipe
from dmp_core.errors import DmpError
from dmp_core.io import write_text
from dmp_core.params_doc import DEFAULT_OUT, recipe_overrides, render, schema_rows
from stages._common import ParamsOpt, echo, guarded

params_app = typer.Typer(help="The params schema: documentation.", no_args_is_help=True)


@params_app.command("doc")
@guarded
def params_doc_cmd(
    out: Annotated[Path, typer.Option(help="the Markdown file to write")] = DEFAULT_OUT,
    params: ParamsOpt = Path("params.yaml"),
    check: Annotated[bool, typer.Option("--check", help="write nothing; exit 1 if OUT is out of date")] = False,
) -> None:
    """Write docs/PARAMS.md (every key, type, default, description) from the schema."""
    text = render(params)
    if check:
        if not out.is_file() or out.read_text() != text:
            raise DmpError(f"{out} is out of date with dmp_core/config.py; run `dmp params doc --out {out}`")
        echo(f"{out} is up to date")
        return
    write_text(out, text)
    echo(f"wrote {out} ({len(schema_rows())} keys)")


def register(app: typer.Typer) -> None:
    app.add_typer(params_app, name="params")


@params_app.command("recipe")
@guarded
def params_recipe_cmd(
    name: Annotated[str, typer.Argument(help="recipe name (dmp_core/recipes/<name>.yaml)")],
    params: ParamsOpt = Path("params.yaml"),
    apply: Annotated[bool, typer.Option("--apply", help="write the recipe into PARAMS (for `dvc repro`) "
                                                        "instead of printing `-S` arguments")] = False,
) -> None:
    """Print a named recipe as `dvc exp run` arguments (`-S ++key=value ...`), or --apply it to
    the params file. Either way the result is validated against the schema first."""
    import yaml as _yaml

    recipe = load_recipe(name)
    raw = _yaml.safe_load(params.read_text()) if params.is_file() else {}
    config_from_dict(apply_dotted(raw or {}, recipe), source=f"{params} + recipe {name}")
    overrides = recipe_overrides(name)
    if not apply:
        print(" ".join(f"-S {o}" for o in overrides))  # no spaces inside: safe in $(...)
        return
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(params), overrides)
    load_config(params)
    echo(f"applied recipe {name} to {params}: {', '.join(o[2:] for o in overrides)}")
