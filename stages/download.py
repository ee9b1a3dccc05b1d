"""``dmp download``: make ``<data.root>/<data.name>/`` a complete Karpathy-layout set and
write ``data/manifest.json``, the file DVC tracks in its place.

Synthetic data is generated (deterministic from ``seed``); Flickr8k/Flickr30k/COCO
are fetched when absent (resumable, checksum-verified where checksums exist) or the
command fails with one line saying what is missing and where to put it; any other
name must already be in place. Data that is already present is only validated.
The manifest lists every listed image's relative path, size and MD5 (see
dmp_core/data/manifest.py and docs/DATA.md): preprocessing re-runs exactly when it changes."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages._common import ParamsOpt, echo, guarded, load


@guarded
def download_cmd(
    params: ParamsOpt = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="where to write the manifest")] = Path("data/manifest.json"),
    cache: Annotated[Optional[Path], typer.Option(
        help="folder for the MD5 cache (default: data/cache of the project the data root is resolved against)",
    )] = None,
) -> None:
    """Generate (synthetic) or fetch the raw dataset, validate it, write the manifest."""
    from dmp_core.data.download import download_with_manifest

    cfg = load(params)
    start = time.perf_counter()
    root, report, man = download_with_manifest(cfg, manifest, cache_dir=cache)
    splits = report["splits"]
    counts = ", ".join(f"{s} {c['images']} images/{c['captions']} captions" for s, c in splits.items())
    missing = f", {report['missing_files']} files missing" if report["missing_files"] else ""
    stats = man["_stats"]
    echo(f"download: {cfg.data.name} in {root}: {counts}{missing}; manifest {manifest}: "
         f"{man['counts']['files']} image files + the split file, {stats['hashed']} hashed, "
         f"{stats['reused']} unchanged since the last run ({time.perf_counter() - start:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("download")(download_cmd)
