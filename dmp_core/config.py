"""Typed, validated parameters: the single source of every knob in ``params.yaml``.

Every section is a pydantic model with ``extra="forbid"`` so that a typo such as
``dvc exp run -S objective.vicerg=false`` fails at once instead of silently adding
a key that nothing reads (treeverse/dvc#6282). Errors are raised as
:class:`ParamsError` whose message is one line naming the dotted key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmp_core.errors import DmpError


class ParamsError(DmpError, ValueError):
    """A bad value in params.yaml; the message is one line naming the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- data
class SyntheticParams(_Section):
    n_train: int = Field(8000, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(1000, ge=8)
    captions_per_image: int = Field(5, ge=1, le=10)
    max_objects: int = Field(3, ge=1, le=4)
    # fraction of the test images that belong to attribute-binding groups
    # (same shapes and colours, other bindings or relations)
    binding_fraction: float = Field(0.5, ge=0.0, le=1.0)


class DataParams(_Section):
    name: Literal["synthetic", "flickr8k", "flickr30k", "coco"] = "synthetic"
    root: str = "data/raw"
    image_size: int = Field(64, ge=16, le=1024)
    resize: Literal["shorter_crop", "squash"] = "shorter_crop"
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    on_bad_item: Literal["error", "skip"] = "error"
    lowercase: bool = True
    remove_punctuation: bool = True
    remove_stopwords: bool = False
    max_words: int = Field(30, ge=1)
    tokenizer: str = "minilm"
    max_tokens: int = Field(32, ge=4, le=512)
    synthetic: SyntheticParams = SyntheticParams()


# ------------------------------------------------------------------------ targets
class HogParams(_Section):
    grad: Literal["sobel", "central"] = "sobel"
    angle: Literal["maskfeat", "skimage"] = "maskfeat"
    cell: int = Field(4, ge=2)
    bins: int = Field(9, ge=2)


class PixelParams(_Section):
    norm_per_patch: bool = False


class TargetsParams(_Section):
    kinds: list[Literal["hog", "pixel"]] = ["hog", "pixel"]
    patch: int = Field(8, ge=2)
    batch_size: int = Field(256, ge=1)
    hog: HogParams = HogParams()
    pixel: PixelParams = PixelParams()

    @model_validator(mode="after")
    def _cells_tile_patch(self) -> "TargetsParams":
        if self.patch % self.hog.cell:
            raise ValueError(f"targets.hog.cell={self.hog.cell} must divide targets.patch={self.patch}")
        return self


# -------------------------------------------------------------------------- model
class ModelParams(_Section):
    preset: Literal["tiny", "minilm", "vit_s_bert_s"] = "tiny"
    # load pretrained weights where the preset has them (text tower for minilm,
    # both towers for vit_s_bert_s); False builds the same shapes randomly initialised
    pretrained: bool = True
    # local overrides of the pretrained sources (a directory in the hub layout or a file)
    image_weights: Optional[str] = None
    text_weights: Optional[str] = None
    embed_dim: Optional[int] = Field(None, ge=8)
    fusion_type: Literal["merged", "coattn"] = "merged"
    image_masking: Literal["token", "zero"] = "token"
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


# ---------------------------------------------------------------------- objective
class VicregParams(_Section):
    """VICReg coefficients (METHOD.md section 4); the on/off switch is `objective.vicreg`."""

    sim_coeff: float = Field(25.0, ge=0.0)
    std_coeff: float = Field(25.0, ge=0.0)
    cov_coeff: float = Field(1.0, ge=0.0)
    expander_dim: int = Field(2048, ge=8)


class ObjectiveParams(_Section):
    variant: Literal["mamo", "denoising"] = "denoising"
    # None = the variant's recipe (METHOD.md sections 3 and 4); True/False overrides
    mrm: Optional[bool] = None
    mim: Optional[bool] = None
    mlm: Optional[bool] = None
    itc: Optional[bool] = None
    itm: Optional[bool] = None
    vicreg: Optional[bool] = None  # `dvc exp run -S objective.vicreg=false`
    mim_target: Optional[Literal["hog", "pixel", "momentum"]] = None
    image_mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    text_mask_ratio: Optional[float] = Field(None, gt=0.0, lt=1.0)
    text_mask_rule: Literal["mask", "bert"] = "mask"
    ema_alpha: float = Field(0.995, gt=0.0, lt=1.0)
    itm_negatives: Literal["auto", "itc", "vicreg", "uniform"] = "auto"
    itc_queue_size: int = Field(0, ge=0)
    itc_distill_alpha: float = Field(0.0, ge=0.0, le=1.0)
    w_mrm: float = Field(1.0, ge=0.0)
    w_mim: float = Field(1.0, ge=0.0)
    w_mlm: float = Field(1.0, ge=0.0)
    w_itc: float = Field(1.0, ge=0.0)
    w_itm: float = Field(1.0, ge=0.0)
    w_vicreg: float = Field(0.04, ge=0.0)
    vicreg_coeffs: VicregParams = VicregParams()

    @model_validator(mode="after")
    def _objectives_are_possible(self) -> "ObjectiveParams":
        self.resolve()  # raises ValueError (-> ParamsError naming objective) on impossible combinations
        return self

    def resolve(self) -> "ResolvedObjectives":
        """Apply the variant's recipe (METHOD.md sections 3-4) and the switches that override it."""
        mamo = self.variant == "mamo"
        recipe = {"mrm": mamo, "mim": True, "mlm": True, "itc": True, "itm": True, "vicreg": not mamo}
        switches = {"mrm": self.mrm, "mim": self.mim, "mlm": self.mlm, "itc": self.itc, "itm": self.itm,
                    "vicreg": self.vicreg}
        on = {name: recipe[name] if switches[name] is None else switches[name] for name in recipe}
        target = self.mim_target or ("momentum" if mamo else "hog")
        if not any(on.values()):
            raise ValueError("every objective is switched off; turn on at least one of mrm, mim, mlm, itc, itm, vicreg")
        if on["mrm"] and not mamo:
            raise ValueError("mrm needs the EMA target model, which only variant=mamo builds")
        if on["mim"] and target == "momentum" and not mamo:
            raise ValueError("mim_target=momentum needs the EMA target model, which only variant=mamo builds")
        negatives = self.itm_negatives
        if on["itm"] and negatives == "auto":
            negatives = "itc" if on["itc"] else "vicreg" if on["vicreg"] else "none"
        if on["itm"] and (negatives == "none" or (negatives in ("itc", "vicreg") and not on[negatives])):
            raise ValueError(
                f"itm has no negative source (itm_negatives={self.itm_negatives}); "
                "turn on itc or vicreg, or set itm_negatives=uniform"
            )
        if self.itc_queue_size or self.itc_distill_alpha:
            raise ValueError("itc_queue_size / itc_distill_alpha (ALBEF momentum queue) are not implemented; keep them 0")
        ratio = self.text_mask_ratio if self.text_mask_ratio is not None else (0.25 if mamo else 0.40)
        return ResolvedObjectives(
            variant=self.variant, mim_target=target, itm_negatives=negatives if on["itm"] else "none",
            image_mask_ratio=self.image_mask_ratio, text_mask_ratio=ratio, needs_ema=on["mrm"] or (on["mim"] and target == "momentum"),
            **on,
        )


class ResolvedObjectives(BaseModel):
    """Which objectives a run actually uses, after the variant recipe and the switches."""

    model_config = ConfigDict(frozen=True)
    variant: str
    mrm: bool
    mim: bool
    mlm: bool
    itc: bool
    itm: bool
    vicreg: bool
    mim_target: str
    itm_negatives: str  # itc | vicreg | uniform | none (itm off)
    image_mask_ratio: float
    text_mask_ratio: float
    needs_ema: bool

    @property
    def active(self) -> list[str]:
        return [name for name in ("itc", "itm", "mlm", "mim", "mrm", "vicreg") if getattr(self, name)]


# ----------------------------------------------------------------------- training
class TrainParams(_Section):
    epochs: int = Field(1, ge=1)
    warmup_epochs: float = Field(0.0, ge=0.0)
    # per process: the global batch under DDP is batch_size * world size
    batch_size: int = Field(64, ge=2)
    # one training pair per image and epoch (caption drawn per epoch) or every caption
    captions: Literal["all", "one_per_image"] = "all"
    lr: float = Field(2.5e-4, gt=0.0)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0.0)
    max_steps: Optional[int] = Field(None, ge=1)  # cap on optimiser steps (CPU budget, smoke runs); None = epochs
    num_workers: int = Field(1, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    val_every: int = Field(0, ge=0)  # steps between val checks; 0 = once per epoch
    log_every: int = Field(10, ge=1)
    amp: Literal["auto", "bf16", "off"] = "auto"


class EvalParams(_Section):
    k_test: int = Field(128, ge=1)
    batch_size: int = Field(128, ge=1)
    itm_batch_size: int = Field(256, ge=1)
    # rows of the similarity matrix handled at once (bounds memory on COCO's 5k x 25k)
    chunk_size: int = Field(1024, ge=1)
    split: Literal["val", "test"] = "test"


class TrackingParams(_Section):
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: "dmp-<data.name>"
    system_metrics: bool = True


class ReportParams(_Section):
    gallery_queries: int = Field(4, ge=1)
    include_seed_numbers: bool = True


class Config(_Section):
    seed: int = 0
    data: DataParams = DataParams()
    targets: TargetsParams = TargetsParams()
    model: ModelParams = ModelParams()
    objective: ObjectiveParams = ObjectiveParams()
    pretrain: TrainParams = TrainParams()
    finetune: TrainParams = TrainParams(lr=1e-4)
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    report: ReportParams = ReportParams()


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in first["loc"][:-1])
        section: Any = Config
        for part in first["loc"][:-1]:
            field = section.model_fields.get(str(part)) if hasattr(section, "model_fields") else None
            section = field.annotation if field is not None else None
        allowed = ", ".join(sorted(section.model_fields)) if hasattr(section, "model_fields") else "?"
        where = f" in '{parent}'" if parent else ""
        return f"unknown key '{key}'{where}; allowed: {allowed}"
    if first["type"] == "literal_error":
        return f"bad value for '{key}': {msg}"
    extra = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"bad value for '{key}': {msg}{extra}"


def config_from_dict(raw: dict[str, Any], source: str = "params") -> Config:
    """Validate a params dict; raise ParamsError with a one-line message."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source}: {_format_error(err)}") from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate ``params.yaml``; every error is one line naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}:{where} invalid YAML") from None
    return config_from_dict(raw, source=str(path))


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config (for MLflow params and report provenance)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=name + "."))
        else:
            out[name] = value
    return out
