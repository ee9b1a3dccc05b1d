"""Typed, validated parameters: the single source of every knob and of its default.

The defaults here are the embedded CPU default (synthetic set, tiny model, 2 cores).
``params.yaml`` lists the knobs a study varies (with these same values; a test checks
it); any other key is set with ``dvc exp run -S ++section.key=value`` and documented in
docs/PARAMS.md, which ``dmp params doc`` generates from this module.

Every section is a pydantic model with ``extra="forbid"`` so that a typo such as
``dvc exp run -S ++objective.vicerg=false`` fails at once (in the pipeline's first
stage, ``params``) instead of silently adding a key that nothing reads
(treeverse/dvc#6282). Cross-field checks (patch sizes, image size, training length)
run at load too. Errors are raised as :class:`ParamsError` whose message is one line
naming the dotted key.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmp_core.errors import DmpError


def nested_count(n: int, fraction: float) -> int:
    """How many of ``n`` items a nested share keeps (``data.fraction``, ``pretrain.data_fraction``):
    all at 1, else ceil(fraction * n) and at least one (none of none). The one count that the
    subset itself (:func:`dmp_core.data.preprocess.fraction_subset`), the schema check, the
    study's plan and the report use."""
    return n if fraction >= 1.0 or n == 0 else max(1, math.ceil(fraction * n))


class ParamsError(DmpError, ValueError):
    """A bad value in params.yaml; the message is one line naming the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- data
class SyntheticParams(_Section):
    n_train: int = Field(8000, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(500, ge=8)  # with eval.k_test 16 the ITM re-ranking fits the CPU budget
    captions_per_image: int = Field(5, ge=1, le=10)
    max_objects: int = Field(3, ge=1, le=4)
    # fraction of the test images that belong to attribute-binding groups
    # (same shapes and colours, other bindings or relations)
    binding_fraction: float = Field(0.5, ge=0.0, le=1.0)


# names whose files `dmp download` knows how to fetch; any other name is a Karpathy-format
# set that must already be in <data.root>/<data.name>/ ("synthetic" is generated)
DOWNLOADABLE = ("flickr8k", "flickr30k", "coco")


class DataParams(_Section):
    # synthetic (generated) | flickr8k | flickr30k | coco | any name of a Karpathy-format set
    name: str = Field("synthetic", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # <root>/<name>/ holds dataset_<name>.json + images/; absolute or relative (see docs/DATA.md)
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
    cell: int = Field(8, ge=2)
    bins: int = Field(9, ge=2)


class PixelParams(_Section):
    # SimMIM targets: per-patch normalised pixels (mean/std of each patch and channel), else
    # pixels normalised with the image tower's mean/std
    norm_per_patch: bool = False


class TargetsParams(_Section):
    kinds: list[Literal["hog", "pixel"]] = ["hog", "pixel"]
    patch: Optional[int] = Field(None, ge=2)  # None = the model preset's patch size (it must equal it)
    batch_size: int = Field(256, ge=1)
    hog: HogParams = HogParams()
    pixel: PixelParams = PixelParams()


# -------------------------------------------------------------------------- model
PRESET_DIR = Path(__file__).parent / "models" / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_spec(name: str) -> dict[str, Any]:
    """The JSON of a model preset (``dmp_core/models/configs/<name>.json``); ParamsError if unknown."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ParamsError(f"model.preset: unknown preset {name!r} (known: {', '.join(preset_names())})")
    return json.loads(path.read_text())


class ModelParams(_Section):
    preset: str = "tiny"  # a file in dmp_core/models/configs/: tiny | minilm | vit_s_bert_s | ...
    # load pretrained weights where the preset has them (text tower for minilm,
    # both towers for vit_s_bert_s); False builds the same shapes randomly initialised
    pretrained: bool = True
    # local overrides of the pretrained sources (a directory in the hub layout or a file)
    image_weights: Optional[str] = None
    text_weights: Optional[str] = None
    embed_dim: Optional[int] = Field(None, ge=8)
    patch_size: Optional[int] = Field(None, ge=2)  # None = the preset's (a pretrained tower keeps its own)
    # the text embedding of ITC/VICReg: the text tower's [CLS] state, or the mean of its token
    # states; None = the preset's ("text.pool": mean for the from-scratch tiny tower, whose
    # [CLS] starts collapsed: cosine 0.9999 between any two captions, so ITC without VICReg
    # sat at ln(batch) for ~250 steps; mean for MiniLM, trained as a mean-pooled sentence
    # embedding: its [CLS] after 4 layers aligned to val R mean 9 where the mean gave 52;
    # cls for BERT-small, as it was trained)
    text_pool: Optional[Literal["cls", "mean"]] = None
    # the fused pair state read by the ITM head: the masked mean of the fused text tokens
    # (every word's view of the image; the default: it ranked the ITC top-k best in the
    # measured candidates, bench/README.md "ITM"), the fused text [CLS] (ALBEF/BLIP; with
    # the mean-pooled tiny text tower that [CLS] is never trained by ITC or MLM), both
    # concatenated, the fusion [CLS] (a learned query at the front of the fused sequence),
    # or fusion [CLS] + fused text [CLS]
    itm_state: Literal["text_mean", "text_cls", "text_cls_mean", "fusion_cls", "concat"] = "text_mean"
    # the ITM classifier on the pair state: one linear layer (ALBEF), or an MLP
    # (Linear-GELU-Linear)
    itm_head: Literal["linear", "mlp"] = "mlp"
    # the image [CLS] state joins the fused sequence (before the patches)
    fusion_image_cls: bool = True
    # masked patches: a learned mask token (ViT: before the position embeddings; CNN: a
    # learned mask colour in pixel space) or zero (the normalised mean colour; the seed's choice)
    image_masking: Literal["token", "zero"] = "token"
    # CNN image towers: the stem and the first k block stages are frozen (and run without
    # autograd); None = the preset's
    image_freeze_stages: Optional[int] = Field(None, ge=0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _preset_exists(self) -> "ModelParams":
        preset_spec(self.preset)
        return self


# ---------------------------------------------------------------------- objective
class VicregParams(_Section):
    """VICReg coefficients (METHOD.md section 4); the on/off switch is `objective.vicreg`."""

    sim_coeff: float = Field(25.0, ge=0.0)
    std_coeff: float = Field(25.0, ge=0.0)
    cov_coeff: float = Field(1.0, ge=0.0)
    # None = the global batch size. A covariance estimated from n samples has rank <= n-1,
    # so a wider expander cannot be fully decorrelated at unit variance: the logged
    # diag_vicreg_cov_floor is the covariance term's lowest reachable value. 512 (with the
    # floor logged) learns faster than width = batch at the CPU budget (bench/README.md)
    expander_dim: Optional[int] = Field(512, ge=8)


class ObjectiveParams(_Section):
    # frozen: the alignment-only baseline (LiT): both pretrained towers locked, only the
    # projections, the fusion and the ITM head trained, with ITC + ITM
    variant: Literal["mamo", "denoising", "frozen"] = "denoising"
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
    # EMA warm-up (timm ModelEmaV3): decay at step s = min(ema_alpha, 1 - (1 + s)^-power), so
    # the teacher leaves its random initial weights within the first steps of a short run
    ema_warmup: bool = True
    ema_warmup_power: float = Field(0.75, gt=0.0, le=1.0)
    # the source of ITM's hard negatives (one per anchor and direction, drawn from the
    # similarity softmax, ALBEF): auto = itc when ITC is on, else vicreg; or uniform
    itm_negatives: Literal["auto", "itc", "vicreg", "uniform"] = "auto"
    # also one negative per anchor and direction drawn uniformly from the batch (an easier
    # one beside the hard one: hard negatives alone left ITM at its prior in 3 of 8 toy
    # seeds; bench/README.md, "ITM")
    itm_uniform_negatives: bool = True
    # the hard negatives' sampling logits ramp from 0 (uniform) to the full similarity over
    # this share of the run (a curriculum from easy to hard negatives); 0 = hard from step 0
    itm_hard_warmup: float = Field(0.0, ge=0.0, le=1.0)
    # also the anchor's own caption with two colours / sizes exchanged or a spatial relation
    # reversed, as a negative of its image (dmp_core/losses/swaps.py; NegCLIP-style)
    itm_swap_negatives: bool = False
    # ITM's loss. binary = the seed's 2-way ITM on one sampled hard (+ one uniform) negative per
    # anchor and direction; listwise = one cross-entropy over each anchor's group (the positive
    # and its itm_group_size ITC-nearest in-batch candidates of other images) on the residual
    # score stop_grad(ITC similarity) / rerank_tau + the re-ranking head's correction
    # (dmp_core/losses/rerank.py); both = the listwise loss on the groups plus the 2-way ITM on
    # the same pairs and one uniform negative per anchor and direction (bench/README.md, "Re-ranking")
    itm_loss: Literal["both", "listwise", "binary"] = "both"
    itm_group_size: int = Field(3, ge=1)
    # the ITC term's temperature in the residual score (ITC's own learned temperature
    # saturates the group softmax; bench/README.md, "Re-ranking")
    rerank_tau: float = Field(0.05, gt=0.0)
    # ALBEF-style soft targets for the listwise loss: (1 - a) * one-hot + a * the ITC term's
    # own softmax over the group (0 = one-hot)
    itm_soft_targets: float = Field(0.0, ge=0.0, lt=1.0)
    w_mrm: float = Field(1.0, ge=0.0)
    w_mim: float = Field(1.0, ge=0.0)
    w_mlm: float = Field(1.0, ge=0.0)
    w_itc: float = Field(1.0, ge=0.0)
    w_itm: float = Field(1.0, ge=0.0)
    # 0.2: the best of a recorded sweep over {0, 0.01, 0.04, 0.1, 0.2, 0.5} (bench/README.md)
    w_vicreg: float = Field(0.2, ge=0.0)
    vicreg_coeffs: VicregParams = VicregParams()

    @model_validator(mode="after")
    def _objectives_are_possible(self) -> "ObjectiveParams":
        self.resolve()  # raises ValueError (-> ParamsError naming objective) on impossible combinations
        return self

    def resolve(self) -> "ResolvedObjectives":
        """Apply the variant's recipe (METHOD.md sections 3-4) and the switches that override it."""
        mamo, frozen = self.variant == "mamo", self.variant == "frozen"
        recipe = {"mrm": mamo, "mim": not frozen, "mlm": not frozen, "itc": True, "itm": True,
                  "vicreg": not (mamo or frozen)}
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
    # the length of the run: exactly `steps` optimiser steps (epochs repeat as needed; the
    # same compute whatever data.fraction is), or `epochs` full passes; set exactly one
    steps: Optional[int] = Field(500, ge=1)
    epochs: Optional[int] = Field(None, ge=1)
    warmup: float = Field(0.1, ge=0.0, lt=1.0)  # linear warmup over this share of the run, then cosine
    # per process: the global batch under DDP is batch_size * world size
    batch_size: int = Field(32, ge=2)
    # one training pair per image and epoch (caption drawn per epoch) or every caption
    captions: Literal["all", "one_per_image"] = "one_per_image"
    lr: float = Field(1e-3, gt=0.0)
    # learning-rate multiplier for the fusion layers and the heads that read fused states
    # (ITM, MLM transform, MIM, MRM predictor); the towers use `lr`
    fusion_lr_scale: float = Field(2.5, gt=0.0)
    # the fused side keeps its peak rate until this share of the run, then decays over the
    # rest (0 = the same cosine as the towers)
    fusion_lr_hold: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0.0)
    num_workers: int = Field(1, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    val_every: int = Field(250, ge=0)  # steps between val checks (best weights kept); 0 = once per epoch
    log_every: int = Field(10, ge=1)
    amp: Literal["auto", "bf16", "off"] = "auto"
    # batches of groups of this many mutual ITC neighbours (by the stage's initial model, from
    # each image's neighbour_pool nearest), so in-batch negatives look like the test's top-k;
    # 0 = random batches (dmp_core/training/sampling.py)
    neighbour_batches: int = Field(0, ge=0)
    neighbour_pool: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainParams":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs (the other null)")
        return self


class PretrainParams(TrainParams):
    """The pretraining recipe: the training knobs plus the seed paper's data axis."""

    # nested share of the training images that pretraining sees (the seed's "data percentage
    # scaling for the number of pretraining samples"); finetuning and the re-ranker's refit
    # always see the whole training split. Equal steps at every value (a smaller share repeats)
    data_fraction: float = Field(1.0, gt=0.0, le=1.0)


class FinetuneParams(TrainParams):
    """The finetuning recipe: the same knobs, its own defaults (a dict in params.yaml that
    sets one key keeps these defaults for the others)."""

    steps: Optional[int] = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    fusion_lr_scale: float = Field(5.0, gt=0.0)
    val_every: int = Field(50, ge=0)


class EvalParams(_Section):
    # ITM re-ranks the top k_test ITC candidates of every query: the seed protocol is 128
    # (Flickr, GPU); ITM costs ~1 ms per pair on 2 CPU cores, hence 16 here
    k_test: int = Field(16, ge=1)
    # the residual re-ranker's knobs, chosen on the val split (never on the test split): the
    # numbers of ITC candidates it may re-order (each <= k_test; null = min(10, k_test) and
    # k_test; below 10 a gold pair outside the top-k counts as missed at R@10, as in ALBEF's
    # protocol with k_test < 10) and the weights of the ITC term
    rerank_ks: Optional[list[int]] = Field(None, min_length=1)
    rerank_itc_weights: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0], min_length=1)
    # the re-ranking head refitted on the retriever's own top-k before it is scored
    # (evaluation/rerank_fit.py): AdamW steps over the ITC top-k_test groups of this many
    # training images (capped at the split), batches of this many queries, the step chosen on
    # the val split every rerank_fit_every steps; 0 steps scores the head as trained
    rerank_fit_steps: int = Field(600, ge=0)
    rerank_fit_images: int = Field(2000, ge=1)
    # caption queries of that bank: the first so many captions of each image (every caption
    # stays a candidate of the image queries, so the negatives are as hard); null = all
    rerank_fit_captions: Optional[int] = Field(None, ge=1)
    rerank_fit_lr: float = Field(1e-3, gt=0.0)
    rerank_fit_batch: int = Field(256, ge=1)
    rerank_fit_every: int = Field(50, ge=1)
    # keep the re-ranker only where the val split shows it beats ITC: the paired cluster
    # bootstrap interval (at this two-sided level) of its val R mean minus ITC's must lie
    # above 0, else the head is reset to zero and the re-ranked order is ITC's exactly
    # (a second stage is not adopted on a val gain within its noise); null: no gate, any
    # val gain keeps the chosen head
    rerank_gate: Optional[float] = Field(None, gt=0.0, lt=1.0)
    batch_size: int = Field(128, ge=1)
    itm_batch_size: int = Field(256, ge=1)
    # rows of the similarity matrix handled at once (bounds memory on COCO's 5k x 25k)
    chunk_size: int = Field(1024, ge=1)
    split: Literal["val", "test"] = "test"
    # diagnostics (evaluation and val checks): per-query ITM AUCs over at most this many
    # image and this many caption queries (over each query's ITC top-k, and against random
    # negatives); modality-use gaps over this many pairs
    diag_queries: int = Field(200, ge=1)
    diag_pairs: int = Field(256, ge=2)
    # the modality-use gaps mask at these ratios for every variant (comparable numbers)
    gap_text_mask_ratio: float = Field(0.4, gt=0.0, lt=1.0)
    gap_image_mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)

    @property
    def rerank_k_choices(self) -> list[int]:
        """The candidate counts the val split chooses from (sorted, unique)."""
        return sorted(set(self.rerank_ks or (min(10, self.k_test), self.k_test)))

    @model_validator(mode="after")
    def _rerank_ks_fit(self) -> "EvalParams":
        bad = [k for k in self.rerank_ks or () if not 1 <= k <= self.k_test]
        if bad:
            raise ValueError(f"rerank_ks {bad}: each k must lie in 1..k_test ({self.k_test})")
        if any(w <= 0 for w in self.rerank_itc_weights):
            raise ValueError(f"rerank_itc_weights {self.rerank_itc_weights}: each weight must be > 0")
        return self


class TrackingParams(_Section):
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: "dmp-<data.name>"
    system_metrics: bool = True


class ReportParams(_Section):
    # the retrieval gallery shows test images: false for research-use photos that a
    # committed report must not carry
    gallery: bool = True
    gallery_queries: int = Field(4, ge=1)
    include_seed_numbers: bool = True
    bootstrap_samples: int = Field(2000, ge=100)  # paired bootstrap of recall differences


class Config(_Section):
    seed: int = 0
    data: DataParams = DataParams()
    targets: TargetsParams = TargetsParams()
    model: ModelParams = ModelParams()
    objective: ObjectiveParams = ObjectiveParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    report: ReportParams = ReportParams()

    @property
    def patch_size(self) -> int:
        """The image tower's patch size (``model.patch_size`` or the preset's; the MIM targets' patch)."""
        return int(self.model.patch_size or preset_spec(self.model.preset)["image"]["patch_size"])

    @property
    def target_patch(self) -> int:
        return self.targets.patch or self.patch_size

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        patch = self.patch_size
        if self.targets.patch is not None and self.targets.patch != patch:
            raise ValueError(f"targets.patch={self.targets.patch} must equal the image tower's patch size {patch} "
                             f"(model.preset={self.model.preset}, model.patch_size={self.model.patch_size}) or be null")
        if self.data.image_size % patch:
            raise ValueError(f"data.image_size={self.data.image_size} must be a multiple of the patch size {patch} "
                             f"of model.preset={self.model.preset}")
        if patch % self.targets.hog.cell:
            raise ValueError(f"targets.hog.cell={self.targets.hog.cell} must divide the patch size {patch}")
        if self.objective.variant == "frozen":
            spec = preset_spec(self.model.preset)
            bare = [tower for tower in ("image", "text") if not spec[tower].get("pretrained")]
            if bare or not self.model.pretrained:
                raise ValueError(f"objective.variant=frozen locks both towers, but model.preset={self.model.preset} "
                                 f"has no pretrained {' or '.join(bare) or 'towers (model.pretrained=false)'} tower")
        if self.pretrain.data_fraction < 1.0 and self.pretrain.neighbour_batches > 1:
            raise ValueError("pretrain.neighbour_batches groups neighbours among all training images; it needs "
                             f"pretrain.data_fraction=1 (got {self.pretrain.data_fraction:g})")
        if self.data.name == "synthetic":
            n_train = nested_count(self.data.synthetic.n_train, self.data.fraction)
            for stage in ("pretrain", "finetune"):
                train = getattr(self, stage)
                share = self.pretrain.data_fraction if stage == "pretrain" else 1.0
                images = nested_count(n_train, share)
                pairs = images * (1 if train.captions == "one_per_image" else self.data.synthetic.captions_per_image)
                if pairs < train.batch_size:
                    raise ValueError(f"{stage}.batch_size={train.batch_size} exceeds the {pairs} synthetic training "
                                     f"pairs (data.synthetic.n_train x data.fraction"
                                     f"{' x pretrain.data_fraction' if share < 1 else ''})")
        return self


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
        names = sorted(section.model_fields) if hasattr(section, "model_fields") else []
        where = f" in '{parent}'" if parent else ""
        close = difflib.get_close_matches(str(first["loc"][-1]), names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key '{key}'{where}; {hint}allowed: {', '.join(names) or '?'}"
    if first["type"] == "literal_error":
        return f"bad value for '{key}': {msg}"
    if first["type"] == "value_error":  # a validator's own message (cross-field checks)
        msg = msg.removeprefix("Value error, ")
        return msg if key == "<root>" else f"'{key}': {msg}"
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


# ----------------------------------------------------------------------- recipes
RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A named recipe: ``dmp_core/recipes/<name>.yaml``, a flat mapping of dotted params keys
    to values (applied on top of params.yaml with ``dvc exp run -S ++key=value``)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown recipe '{name}' (known: {', '.join(recipe_names())})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or any(not isinstance(k, str) or isinstance(v, (dict, list)) for k, v in raw.items()):
        raise ParamsError(f"{path}: a recipe is a flat mapping of dotted keys to scalar values")
    return raw


def apply_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the params dict ``raw`` with dotted-key ``overrides`` set."""
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):  # absent, or an empty section (`tracking:`)
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out
