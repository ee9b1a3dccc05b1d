"""The model: ``create_model(model_params, *, image_size, vocab_size) -> DMPModel``.

A preset (``configs/<name>.json``) names the timm image architecture (a ViT, or with
``"kind": "cnn"`` an EfficientNet whose last feature map is the token grid) and its patch size,
the BERT shape, where pretrained weights come from and how the BERT layers split into
text and fusion halves; the ``model`` section of params.yaml overrides it.
:func:`model_from_config` builds the model a whole config implies (with the MIM head
its objective needs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transformers import BertConfig

from dmp_core.config import PRESET_DIR, Config, ModelParams, ParamsError, preset_spec
from dmp_core.errors import CheckpointError
from dmp_core.models.cnn import CNNTower
from dmp_core.models.fusion import MergedFusion
from dmp_core.models.model import DMPModel
from dmp_core.models.text import TextTower, load_bert, load_mlm_head_state
from dmp_core.models.vision import VisionTower

__all__ = ["DMPModel", "create_model", "model_from_config", "mim_dim_for", "load_preset", "load_weights",
           "PRESET_DIR"]


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
    return preset_spec(name)


def mim_dim_for(cfg: Config, image_dim: int) -> Optional[int]:
    """Output width of the MIM head the pretraining objective needs (None: no MIM):
    3 * bins * (patch / cell)^2 for HOG, patch^2 * 3 for pixels, the image width for
    MAMO's momentum features."""
    objectives = cfg.objective.resolve()
    if not objectives.mim:
        return None
    if objectives.mim_target == "momentum":
        return image_dim
    patch = cfg.target_patch
    if objectives.mim_target == "hog":
        return 3 * cfg.targets.hog.bins * (patch // cfg.targets.hog.cell) ** 2
    return patch * patch * 3


def model_from_config(cfg: Config, vocab_size: int, *, pretrained: Optional[bool] = None) -> DMPModel:
    """The DMPModel a whole config implies: ``model.*`` plus the MIM head of its objective.

    ``pretrained=False`` skips loading pretrained tower weights (e.g. when a checkpoint
    will be loaded next); None keeps ``model.pretrained``."""
    params = cfg.model if pretrained is None else cfg.model.model_copy(update={"pretrained": pretrained})
    return create_model(params, image_size=cfg.data.image_size, vocab_size=vocab_size,
                        mim_dim=lambda image_width: mim_dim_for(cfg, image_width))


def create_model(model_params: ModelParams, *, image_size: int, vocab_size: int,
                 spec: dict[str, Any] | None = None, mim_dim: Any = None) -> DMPModel:
    """Build the model for ``model.preset`` with the overrides of the ``model`` section.

    ``image_size`` is data.image_size; ``vocab_size`` comes from the prepared data's meta.json.
    ``model.pretrained=false`` gives the same shapes randomly initialised (no network).
    ``spec`` replaces the preset file's content (tests and experiments with other shapes).
    ``mim_dim``: the MIM head's output width, or a function of the image tower width, or None."""
    spec = spec if spec is not None else load_preset(model_params.preset)
    if model_params.patch_size is not None:
        if model_params.pretrained and spec["image"].get("pretrained") and model_params.patch_size != spec["image"]["patch_size"]:
            raise ParamsError(f"model.patch_size={model_params.patch_size}: the pretrained image tower of preset "
                              f"{model_params.preset} has patch size {spec['image']['patch_size']}")
        spec = {**spec, "image": {**spec["image"], "patch_size": model_params.patch_size}}
    kwargs = dict(image_size=image_size, pretrained=model_params.pretrained, weights=model_params.image_weights,
                  drop_path=model_params.drop_path, masking=model_params.image_masking)
    if spec["image"].get("kind", "vit") == "cnn":
        vision = CNNTower(spec["image"], freeze_stages=model_params.image_freeze_stages, **kwargs)
    else:
        if model_params.image_freeze_stages:
            raise ParamsError(f"model.image_freeze_stages: preset {model_params.preset} has a ViT image tower "
                              "(freezing stages applies to CNN towers)")
        vision = VisionTower(spec["image"], **kwargs)
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
    fusion = MergedFusion(layers[n_text:], vision.width, config.hidden_size, vision.num_patches,
                          fusion_cls=model_params.itm_state in ("fusion_cls", "concat"), image_cls=model_params.fusion_image_cls,
                          eps=config.layer_norm_eps)
    cfg = vision.pretrained_cfg
    width = mim_dim(vision.width) if callable(mim_dim) else mim_dim
    model = DMPModel(
        vision, text, fusion, config,
        embed_dim=model_params.embed_dim or spec["embed_dim"],
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        preset=model_params.preset, itm_state=model_params.itm_state, itm_head=model_params.itm_head, mim_dim=width,
        text_pool=model_params.text_pool or spec["text"].get("pool", "cls"),
    )
    source = getattr(bert, "dmp_source", None)
    if source is not None:  # a pretrained text tower: its MLM transform too, when the checkpoint has one
        head = load_mlm_head_state(source)
        if head is not None:
            model.mlm_head.load_state_dict(head, strict=True)
    return model
