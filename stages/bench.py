"""``dmp bench hog|step|eval``: timings printed as one JSON line each."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOpt, guarded, load

bench_app = typer.Typer(help="Benchmarks (one JSON line each).", no_args_is_help=True)


@bench_app.command("hog")
@guarded
def hog_cmd(
    n_images: Annotated[int, typer.Option(help="number of 224 px images")] = 64,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 224,
    repeats: Annotated[int, typer.Option(help="timed repeats (best is kept)")] = 3,
) -> None:
    """Batched torch HOG vs a per-image scikit-image loop on the same images."""
    from dmp_core.benchmarks.hog import bench_hog

    print(json.dumps(bench_hog(n_images=n_images, size=size, repeats=repeats)), flush=True)


@bench_app.command("step")
@guarded
def step_cmd(
    variant: Annotated[str, typer.Option(help="mamo | denoising")] = "denoising",
    preset: Annotated[str, typer.Option(help="model preset")] = "tiny",
    batch: Annotated[int, typer.Option(help="pairs per step")] = 32,
    steps: Annotated[int, typer.Option(help="timed steps")] = 20,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 3,
    amp: Annotated[str, typer.Option(help="auto | bf16 | off (pretrain.amp)")] = "auto",
    image_size: Annotated[int, typer.Option(help="data.image_size (0: params.yaml's)")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Full pretraining steps (forward, backward, optimiser, EMA where present)."""
    from dmp_core.benchmarks.step import bench_step

    cfg = load(params)
    print(json.dumps(bench_step(cfg, variant=variant, preset=preset, batch=batch, steps=steps, warmup=warmup,
                                amp=amp, image_size=image_size or None)), flush=True)


@bench_app.command("eval")
@guarded
def eval_cmd(
    subset: Annotated[int, typer.Option(help="images in the exhaustive-ITM subset")] = 100,
    checkpoint: Annotated[str, typer.Option(help="model weights (default: models/finetune)")] = "",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Re-ranked evaluation vs exhaustive ITM scoring of all pairs on a subset."""
    from dmp_core.benchmarks.eval import bench_eval

    cfg = load(params)
    print(json.dumps(bench_eval(cfg, subset=subset, checkpoint=checkpoint or None)), flush=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
