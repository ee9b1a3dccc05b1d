"""The model: ``create_model(model_params, *, image_size, vocab_size) -> DMPModel``.

A preset (``configs/<name>.json``) names the timm image architecture, the BERT shape,
where pretrained weights come from and how the BERT layers split into text and fusion
halves; the ``model`` section of params.yaml overrides it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import BertConfig

from dmp_core.config import ModelParams, ParamsError
from dmp_core.errors import CheckpointError
from dmp_core.models.fusion import MergedFusion
from dmp_core.models.model import DMPModel
from dmp_core.models.text import TextTower, load_bert
from dmp_core.models.vision import VisionTower

PRESET_DIR = Path(__file__).parent / "configs"

__all__ = ["DMPModel", "create_model", "load_preset", "load_weights", "PRESET_DIR"]


def load_weights(model: DMPModel, path: str | Path, *, missing_hint: str) -> DMPModel:
    """Load a ``model.safetensors`` state dict strictly; one-line CheckpointError otherwise.

    ``missing_hint`` says what produces the file (e.g. "run the pretrain stage first")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found ({missing_hint})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: does not match model preset '{model.preset}' ({what})")
    return model


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise ParamsError(f"model.preset: unknown preset {name!r} (known: {known})")
    return json.loads(path.read_text())


def create_model(model_params: ModelParams, *, image_size: int, vocab_size: int,
                 spec: dict[str, Any] | None = None) -> DMPModel:
    """Build the model for ``model.preset`` with the overrides of the ``model`` section.

    ``image_size`` is data.image_size; ``vocab_size`` comes from the prepared data's meta.json.
    ``model.pretrained=false`` gives the same shapes randomly initialised (no network).
    ``spec`` replaces the preset file's content (tests and experiments with other shapes)."""
    if model_params.fusion_type != "merged":
        raise ParamsError("model.fusion_type=coattn is not implemented; use merged")
    spec = spec if spec is not None else load_preset(model_params.preset)
    vision = VisionTower(
        spec["image"], image_size=image_size, pretrained=model_params.pretrained,
        weights=model_params.image_weights, drop_path=model_params.drop_path, masking=model_params.image_masking,
    )
    if image_size % vision.patch_size:
        raise ParamsError(f"data.image_size={image_size} is not a multiple of the patch size {vision.patch_size}")
    bert = load_bert(spec["text"], vocab_size=vocab_size, pretrained=model_params.pretrained,
                     weights=model_params.text_weights)
    config: BertConfig = bert.config
    n_layers, n_text = len(bert.encoder.layer), spec["text"]["text_layers"]
    if not 0 < n_text < n_layers:
        raise ParamsError(f"model preset {model_params.preset}: text_layers={n_text} must split {n_layers} BERT layers")
    layers = list(bert.encoder.layer)
    text = TextTower(bert.embeddings, layers[:n_text])
    fusion = MergedFusion(layers[n_text:], vision.width, config.hidden_size, eps=config.layer_norm_eps)
    cfg = vision.vit.pretrained_cfg
    return DMPModel(
        vision, text, fusion, config,
        embed_dim=model_params.embed_dim or spec["embed_dim"],
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        preset=model_params.preset,
    )
