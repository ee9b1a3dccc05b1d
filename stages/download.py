"""``dmp download``: make ``<data.root>/<data.name>/`` a complete Karpathy-layout set.

Synthetic data is generated (deterministic from ``seed``); Flickr8k/Flickr30k/COCO
are fetched when absent (resumable, checksum-verified where checksums exist) or the
command fails with one line saying what is missing and where to put it. Data that
is already present is only validated."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from stages._common import ParamsOpt, echo, guarded, load


@guarded
def download_cmd(params: ParamsOpt = Path("params.yaml")) -> None:
    """Generate (synthetic) or fetch the raw dataset, then validate it."""
    from dmp_core.data.download import download_and_validate

    cfg = load(params)
    start = time.perf_counter()
    root, report = download_and_validate(cfg)
    splits = report["splits"]
    counts = ", ".join(f"{s} {c['images']} images/{c['captions']} captions" for s, c in splits.items())
    missing = f", {report['missing_files']} files missing" if report["missing_files"] else ""
    echo(f"download: {cfg.data.name} in {root}: {counts}{missing} ({time.perf_counter() - start:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("download")(download_cmd)
