"""``dmp model info --preset NAME``: parameter counts per part of a preset (random init, no network)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages._common import ParamsOpt, guarded, load

model_app = typer.Typer(help="Model presets.", no_args_is_help=True)


@model_app.command("info")
@guarded
def model_info_cmd(
    preset: Annotated[Optional[str], typer.Option(help="tiny | minilm | vit_s_bert_s (default: model.preset)")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="image side in pixels (default: data.image_size)")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary size (MiniLM / BERT uncased: 30522)")] = 30522,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Print parameter counts (image tower, text tower, fusion, heads, total), then one JSON line."""
    from dmp_core.models import create_model, load_preset

    cfg = load(params)
    name = preset or cfg.model.preset
    spec = load_preset(name)  # one-line error for an unknown preset
    size = image_size or cfg.data.image_size
    model_params = cfg.model.model_copy(update={"preset": name, "pretrained": False,
                                                "image_weights": None, "text_weights": None})
    model = create_model(model_params, image_size=size, vocab_size=vocab_size)
    counts = model.parameter_counts()
    typer.echo(f"preset {name}: {spec.get('description', '')}")
    typer.echo(f"image {size} px, patch {model.patch_size}, {model.num_patches} patches; "
               f"widths image {model.image_dim} / text {model.text_dim} / embed {model.embed_dim}")
    for part, n in counts.items():
        typer.echo(f"  {part:<12} {n:>12,}")
    typer.echo(json.dumps({"preset": name, "image_size": size, **counts}))


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
