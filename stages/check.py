"""``dmp check``: the pipeline's first DVC stage (``params`` in dvc.yaml).

It loads and validates the params file (unknown keys, bad values and every cross-field
check live in :func:`dmp_core.config.load_config`), prints one line saying what the run
will do, and writes a marker file with CONSTANT content. Every other stage depends on
the marker, so:

- a typo (``dvc exp run -S ++objective.vicerg=false``) fails here, before DVC removes the
  outputs of any later stage (DVC removes a stage's outputs only when it runs that stage);
- a passing check rewrites identical bytes, so it never invalidates a downstream stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from dmp_core.config import Config
from dmp_core.errors import DmpError
from dmp_core.io import write_text
from stages._common import ParamsOpt, guarded, load

# constant on purpose: its hash must not change when params change (see the module docstring)
MARKER_TEXT = "params validated by `dmp check` (constant content: see stages/check.py)\n"


def _train_length(cfg: Config, stage: str) -> str:
    train = getattr(cfg, stage)
    length = f"{train.steps} steps" if train.steps is not None else f"{train.epochs} epochs"
    return f"{stage} {length} x {train.batch_size}"


def summary(cfg: Config, params: Path) -> str:
    """One line: the resolved run (what ran is what the variant recipe and the switches give)."""
    res = cfg.objective.resolve()
    mim = f"MIM target {res.mim_target}" if res.mim else "no MIM"
    return (f"{params}: ok: variant {res.variant}, objectives {','.join(res.active)}, {mim}, "
            f"mask ratios image {res.image_mask_ratio:g} / text {res.text_mask_ratio:g}, "
            f"model {cfg.model.preset} at {cfg.data.image_size} px, data {cfg.data.name} x{cfg.data.fraction:g}, "
            f"{_train_length(cfg, 'pretrain')}, {_train_length(cfg, 'finetune')}, seed {cfg.seed}")


def in_workspace_experiment(cwd: Optional[Path] = None) -> bool:
    """True inside ``dvc exp run`` in the workspace (not ``--temp``/``--queue``): DVC has then
    already written the ``-S`` values into the user's own params.yaml."""
    if not os.environ.get("DVC_EXP_NAME"):
        return False
    cwd = (cwd or Path.cwd()).resolve()
    return "/.dvc/tmp/exps/" not in f"{cwd}/"


def check(params: Path, marker: Optional[Path]) -> str:
    """Validate ``params``; write ``marker`` only when valid. Returns the summary line."""
    try:
        cfg = load(params)
    except DmpError as err:
        if in_workspace_experiment():
            raise type(err)(f"{err} (`dvc exp run` in the workspace leaves its -S values in {params}: "
                            f"undo them, e.g. `git checkout {params}`)") from None
        raise
    if marker is not None:
        write_text(marker, MARKER_TEXT)
    return summary(cfg, params)


def register(app: typer.Typer) -> None:
    @app.command("check")
    @guarded
    def check_cmd(
        params: ParamsOpt = Path("params.yaml"),
        marker: Annotated[Optional[Path],
                          typer.Option(help="file written (constant content) when the params are valid")] = None,
    ) -> None:
        """Validate the params file, print the resolved run in one line, write the marker."""
        typer.echo(f"dmp check: {check(params, marker)}")
