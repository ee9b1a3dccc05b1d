"""``dmp preprocess``: raw Karpathy-layout data -> ``data/prepared/<split>/`` arrays
(images.npy, captions.parquet, tokens.npy, attention_mask.npy, images.json) and
``data/prepared/meta.json``; skipped items are listed in
``reports/preprocess/summary.json``. The raw folder is ``<data.root>/<data.name>``, with a
relative ``data.root`` resolved as the download stage resolves it (docs/DATA.md)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages._common import ParamsOpt, echo, guarded, load


@guarded
def preprocess_cmd(
    params: ParamsOpt = Path("params.yaml"),
    raw: Annotated[Optional[Path], typer.Option(help="raw dataset folder (default <data.root>/<data.name>, resolved)")] = None,
    out: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    reports: Annotated[Path, typer.Option(help="folder for summary.json")] = Path("reports/preprocess"),
    workers: Annotated[Optional[int], typer.Option(help="decoding threads (default: CPU count, at most 8)")] = None,
) -> None:
    """Decode, resize, clean and tokenise every split."""
    from dmp_core.data.download import dataset_dir
    from dmp_core.data.preprocess import run_preprocess

    cfg = load(params)
    start = time.perf_counter()
    summary = run_preprocess(cfg, raw_dir=raw or dataset_dir(cfg), out_dir=out, reports_dir=reports,
                             workers=workers)
    counts = ", ".join(f"{s} {c['images']} images/{c['captions']} captions" for s, c in summary["counts"].items())
    echo(f"preprocess: {cfg.data.name} -> {out}: {counts}; {summary['skipped_total']} items skipped "
         f"({time.perf_counter() - start:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("preprocess")(preprocess_cmd)
