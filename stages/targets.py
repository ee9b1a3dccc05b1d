"""``dmp targets``: HOG and pixel reconstruction targets for every prepared split."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOpt, echo, guarded, load


@guarded
def targets_cmd(
    params: ParamsOpt = Path("params.yaml"),
    prepared: Annotated[Path, typer.Option(help="prepared data folder (<split>/images.npy)")] = Path("data/prepared"),
    out: Annotated[
        Path, typer.Option(help="output folder (<split>/{hog,pixel}.npy, targets.json)")
    ] = Path("data/targets"),
) -> None:
    """Precompute targets.kinds per split -> <out>/<split>/{hog,pixel}.npy (float16) + targets.json."""
    from dmp_core.targets import run_targets

    cfg = load(params)
    summary = run_targets(cfg, prepared_dir=prepared, out_dir=out)
    parts = []
    for split, info in summary["splits"].items():
        shapes = ", ".join(f"{kind} {'x'.join(map(str, shape[1:]))}" for kind, shape in info["shapes"].items())
        parts.append(f"{split} {info['images']} images ({shapes})")
    echo(f"targets: {'; '.join(parts)} -> {out} in {summary['seconds']:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("targets")(targets_cmd)
