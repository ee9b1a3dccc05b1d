"""Runs as the report sees them: params canonicalised and labelled by their difference from the
baseline, :class:`Run`, duplicates merged, seed groups (:class:`Group`), a study's planned runs
that no run is (:func:`missing_points`), the stale-workspace warnings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from dmp_core.config import Config, ObjectiveParams, ParamsError, apply_dotted, config_from_dict, flatten
from dmp_core.errors import DataError
from dmp_core.stats import Ranks, canonical_clusters

MODELS = ("finetune", "pretrain")
SCORER_NAMES = {"rerank": "residual re-ranked", "itm": "ITM re-ranked", "itm_itc": "ITM + ITC (BLIP)",
                "itc": "ITC only"}
# the seed's scorer: the ITM margin alone on the ITC top-k (ALBEF), shown beside every headline
SEED_SCORER = "itm"
# params that never make two runs different methods (where things run, how they are logged)
IGNORED_PARAMS = ("seed", "tracking.", "report.", "data.root", "eval.batch_size", "eval.itm_batch_size",
                  "eval.chunk_size", "eval.diag_queries", "eval.diag_pairs", "pretrain.num_workers",
                  "finetune.num_workers", "pretrain.log_every", "finetune.log_every", "pretrain.checkpoint_every",
                  "finetune.checkpoint_every", "targets.batch_size")
# objective keys whose null means "the variant's recipe" (see canonical_params)
RECIPE_KEYS = ("mrm", "mim", "mlm", "itc", "itm", "vicreg", "mim_target", "text_mask_ratio", "itm_negatives")
# stages that run every time (dvc.yaml always_changed), so `dvc status` always lists them
ALWAYS_CHANGED_STAGES = ("params", "download", "report")
# the data-scaling axes, in the order the report shows them, with their names in the report:
# pretraining sees a nested share of the training images (finetuning and the re-ranker's refit
# see all of them), or the whole pipeline sees one
SCALING_AXES = {"pretrain.data_fraction": "pretraining fraction", "data.fraction": "whole-pipeline fraction"}


# ------------------------------------------------------------------ params
def canonical_params(cfg: Config) -> dict[str, Any]:
    """Dotted-key params in which equal settings compare equal.

    ``flatten(cfg)`` of a validated config (schema defaults fill absent keys), with the
    objective switches written relative to the variant's recipe: ``None`` where the
    resolved value is what the variant does anyway (``vicreg: true`` for denoising is
    ``None``, like ``vicreg: null``), the resolved value otherwise; ``targets.patch``
    equal to the model's patch size is ``None`` too.
    """
    flat = flatten(cfg)
    actual = cfg.objective.resolve()
    recipe_fields = {k: None for k in RECIPE_KEYS if k != "itm_negatives"}
    recipe = cfg.objective.model_copy(update={**recipe_fields, "itm_negatives": "auto"}).resolve()
    for key in RECIPE_KEYS:
        value = getattr(actual, key)
        irrelevant = (key == "mim_target" and not actual.mim) or (key == "itm_negatives" and not actual.itm)
        flat[f"objective.{key}"] = None if irrelevant or value == getattr(recipe, key) else value
    if flat.get("targets.patch") == cfg.patch_size:
        flat["targets.patch"] = None
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    return apply_dotted({}, dict(flat))


def _validate(flat: Mapping[str, Any], source: str) -> tuple[Optional[Config], str]:
    try:
        return config_from_dict(_nest(flat), source=source), ""
    except ParamsError as err:
        return None, str(err)


def resolve_params(raw: Optional[Mapping[str, Any]], source: str) -> tuple[dict[str, Any], Optional[str]]:
    """Canonical params of a raw params.yaml dict, and a note when it does not validate.

    A params file written for an older schema still gets compared: keys the schema does
    not know are dropped, then, one at a time, each key whose removal clears the
    current validation error (e.g. ``epochs`` where the schema now defaults ``steps``),
    so schema defaults stand in for them. The note names every dropped key. If no
    such key is found, the schema defaults overlaid with the known keys are used
    unvalidated.
    """
    raw = dict(raw or {})
    cfg, problem = _validate(flatten(raw), source)
    if cfg is not None:
        return canonical_params(cfg), None
    known = flatten(Config())
    given = {k: v for k, v in flatten(raw).items() if k in known}
    dropped = sorted(set(flatten(raw)) - set(known))
    cfg, error = _validate(given, source)
    while cfg is None:
        culprit = None
        for key in given:
            trial, trial_error = _validate({k: v for k, v in given.items() if k != key}, source)
            if trial is not None or trial_error != error:
                culprit, cfg, error = key, trial, trial_error
                break
        if culprit is None:
            break
        dropped.append(culprit)
        del given[culprit]
    note = f"{problem}; compared on the keys it shares with the current schema"
    if dropped:
        note += f" (dropped: {', '.join(dropped)})"
    if cfg is None:
        return {**known, **given}, note + "; not valid even so, compared unvalidated"
    return canonical_params(cfg), note


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORED_PARAMS)


def param_diff(params: Mapping[str, Any], baseline: Mapping[str, Any], *, keep_seed: bool = False) -> dict[str, Any]:
    """Params (other than bookkeeping, and seed unless ``keep_seed``) whose value differs from the baseline's."""
    keys = sorted(set(params) | set(baseline))
    return {k: params.get(k) for k in keys
            if (not _ignored(k) or (keep_seed and k == "seed")) and params.get(k) != baseline.get(k)}


def method_params(params: Mapping[str, Any]) -> tuple:
    """The params that define a method (all but seed and bookkeeping), hashable."""
    return tuple(sorted((k, repr(v)) for k, v in params.items() if not _ignored(k)))


def _fmt_value(key: str, value: Any) -> str:
    if value is None:
        return "recipe" if key.startswith("objective.") and key.split(".")[-1] in RECIPE_KEYS else "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _short(key: str) -> str:
    return key.removeprefix("objective.")


def describe_diff(diff: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """``vicreg=false, data.fraction=0.1``: a diff as readable settings."""
    return ", ".join(f"{_short(k)}={_fmt_value(k, v)}" for k, v in diff.items() if k not in set(skip))


def label_for(params: Mapping[str, Any], diff: Mapping[str, Any]) -> str:
    """The variant, then the other settings that differ from the baseline; ``(baseline)`` when none do."""
    variant = str(params.get("objective.variant") or "?")
    rest = describe_diff(diff, skip=("objective.variant",))
    if rest:
        return f"{variant} ({rest})"
    return variant if "objective.variant" in diff else f"{variant} (baseline)"


# ------------------------------------------------------------------ runs
def trained_mlm(params: Mapping[str, Any]) -> bool:
    """Whether the run's pretraining had MLM (its objective switches resolved); True when
    the params do not say (older or unreadable ones)."""
    flat = {k.split(".", 1)[1]: v for k, v in params.items()
            if k.startswith("objective.") and k.count(".") == 1}
    try:  # None is "the variant's recipe" (canonical_params), as absent
        return bool(ObjectiveParams.model_validate({k: v for k, v in flat.items() if v is not None}).resolve().mlm)
    except ValueError:  # pydantic's ValidationError included
        return True


def metrics_to_models(metrics: Optional[Mapping[str, Any]]) -> dict[str, dict]:
    """reports/evaluate/metrics.json in the shape of details.json's ``models``.

    Reads the current contract (``finetune.tr_r1`` = headline scorer, ``itc_r_mean``,
    ``diagnostics.finetune_itm_auc``) and the older one (``finetune.itm_tr_r1``).
    """
    models: dict[str, dict] = {}
    for model in MODELS:
        for key, value in dict((metrics or {}).get(model) or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            scorer, _, rest = key.partition("_")
            if scorer not in SCORER_NAMES or not rest:  # the headline scorer's numbers carry no prefix:
                scorer, rest = _metrics_headline(metrics.get(model) or {}), key
            models.setdefault(model, {}).setdefault(scorer, {})[rest] = float(value)
    for key, value in dict((metrics or {}).get("diagnostics") or {}).items():
        model, _, name = key.partition("_")
        if model in MODELS and name:
            models.setdefault(model, {}).setdefault("diagnostics", {})[name] = value
    return models


def _metrics_headline(numbers: Mapping[str, Any]) -> str:
    """The headline scorer of a metrics.json section: the residual re-ranker where the seed's
    scorer (``itm_r_mean``) sits beside an unprefixed headline (``r_mean``), else the older
    contracts' ITM re-ranking."""
    return "rerank" if "itm_r_mean" in numbers and "r_mean" in numbers else "itm"


@dataclass
class Run:
    """One finished pipeline run, as the report sees it."""

    names: list[str]  # workspace, HEAD (<sha>), DVC experiment names (several when rows were merged)
    params: dict[str, Any]  # canonical params (resolve_params)
    workspace: bool = False
    rev: Optional[str] = None  # git commit of an experiment or of HEAD
    details: Optional[dict] = None  # reports/evaluate/details.json
    ranks: Optional[dict[str, np.ndarray]] = None  # reports/evaluate/ranks.npz
    metrics: Optional[dict] = None  # reports/evaluate/metrics.json (fallback for details)
    training: dict[str, dict] = field(default_factory=dict)  # stage -> reports/<stage>/metrics.json
    run_ids: dict[str, str] = field(default_factory=dict)  # stage -> MLflow run id
    split_images: dict[str, int] = field(default_factory=dict)  # split -> images (reports/preprocess/summary.json)
    notes: list[str] = field(default_factory=list)  # anything odd (e.g. params of an older schema)

    @property
    def name(self) -> str:
        return ", ".join(self.names)

    @property
    def missing(self) -> list[str]:
        """The evaluation files this run lacks, and what that costs."""
        out = []
        if self.details is None:
            out.append("no details.json (recall from metrics.json, no diagnostics unless metrics.json has them)"
                       if self.metrics else "no details.json or metrics.json (no recall)")
        if self.ranks is None:
            out.append("no ranks.npz (no bootstrap intervals for this run)")
        return out

    @property
    def seed(self) -> Any:
        return self.params.get("seed")

    @property
    def models(self) -> dict[str, dict]:
        if self.details and self.details.get("models"):
            return self.details["models"]
        return metrics_to_models(self.metrics)

    @property
    def headline(self) -> str:
        if self.details and self.details.get("headline_scorer"):
            return str(self.details["headline_scorer"])
        return _metrics_headline((self.metrics or {}).get("finetune") or {})

    def recall(self, model: str, key: str, scorer: Optional[str] = None) -> Optional[float]:
        value = self.models.get(model, {}).get(scorer or self.headline, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def diagnostics(self, model: str) -> dict[str, Any]:
        """The model's diagnostics; without an MLM objective (``objective.variant=frozen``) the
        image-use gap, an MLM loss difference read through an untrained MLM head, is dropped."""
        diag = dict(self.models.get(model, {}).get("diagnostics") or {})
        if not trained_mlm(self.params):
            for key in [k for k in diag if k.startswith(("image_use_gap", "mlm_loss_"))]:
                del diag[key]
        return diag

    @property
    def txt2img(self) -> Optional[np.ndarray]:
        return None if self.ranks is None or "txt2img" not in self.ranks else np.asarray(self.ranks["txt2img"])

    @property
    def clusters(self) -> Optional[np.ndarray]:
        """ranks.npz ``clusters`` (the bootstrap unit of each image) relabelled 0..C-1; None if absent.

        Absent (evaluate outputs older than the field) means one unit per image.
        """
        if self.ranks is None or "clusters" not in self.ranks or self.txt2img is None:
            return None
        n_images = int(self.txt2img.max()) + 1
        try:
            return canonical_clusters(np.asarray(self.ranks["clusters"]), n_images)
        except DataError as err:
            raise DataError(f"run {self.name}: ranks.npz: {err}") from None

    def model_ranks(self, model: str, scorer: Optional[str] = None) -> Optional[Ranks]:
        scorer = scorer or self.headline
        keys = (f"{model}_{scorer}_tr", f"{model}_{scorer}_ir")
        if self.ranks is None or not all(k in self.ranks for k in keys):
            return None
        return Ranks(np.asarray(self.ranks[keys[0]]), np.asarray(self.ranks[keys[1]]))

    @property
    def split(self) -> dict[str, Any]:
        """dataset, name, image_size, images, texts (details.json, else params and ranks.npz)."""
        split = dict((self.details or {}).get("split") or {})
        split.setdefault("dataset", self.params.get("data.name"))
        split.setdefault("name", self.params.get("eval.split"))
        split.setdefault("image_size", self.params.get("data.image_size"))
        if self.txt2img is not None:
            split.setdefault("images", int(self.txt2img.max()) + 1)
            split.setdefault("texts", int(len(self.txt2img)))
        return split

    def training_value(self, stage: str, key: str) -> Any:
        return (self.training.get(stage) or {}).get(key)


def _same_results(a: Run, b: Run) -> bool:
    return bool(a.models) and a.models == b.models


def merge_duplicates(runs: Sequence[Run]) -> list[Run]:
    """One row for runs with the same params (seed included) and the same metrics.

    The workspace after ``dvc exp apply``, the HEAD commit and the experiment it came
    from are one run; the merged row lists every name (the workspace first).
    """
    merged: list[Run] = []
    for run in runs:
        twin = next((m for m in merged if param_diff(m.params, run.params, keep_seed=True) == {}
                     and _same_results(m, run)), None)
        if twin is None:
            merged.append(Run(**{**run.__dict__, "names": list(run.names), "notes": list(run.notes),
                                 "run_ids": dict(run.run_ids), "training": dict(run.training)}))
            continue
        twin.names += [n for n in run.names if n not in twin.names]
        twin.workspace = twin.workspace or run.workspace
        twin.rev = twin.rev or run.rev
        for attr in ("details", "ranks", "metrics"):
            if getattr(twin, attr) is None:
                setattr(twin, attr, getattr(run, attr))
        for stage, values in run.training.items():
            twin.training.setdefault(stage, values)
        for stage, run_id in run.run_ids.items():
            twin.run_ids.setdefault(stage, run_id)
        twin.notes += [n for n in run.notes if n not in twin.notes]
    for run in merged:
        run.names.sort(key=lambda n: n != "workspace")
    return merged


# ------------------------------------------------------------------ groups
@dataclass
class Group:
    """Runs that differ only in seed (one method)."""

    label: str
    diff: dict[str, Any]  # method params that differ from the baseline
    params: dict[str, Any]  # of its first run
    runs: list[Run]

    @property
    def variant(self) -> Any:
        return self.params.get("objective.variant")

    def axis(self, key: str) -> float:
        """The group's value of a scaling axis (:data:`SCALING_AXES`); 1.0 where its params
        predate the key (every image, as before the key existed)."""
        value = self.params.get(key)
        return 1.0 if value is None else float(value)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def values(self, model: str, key: str, scorer: Optional[str] = None) -> list[float]:
        return [v for r in self.runs if (v := r.recall(model, key, scorer)) is not None]

    def representative(self, model: str = "finetune") -> Optional[Run]:
        """Seed 0 if it has ranks, else the lowest seed that has them."""
        with_ranks = [r for r in self.runs if r.model_ranks(model) is not None]
        return min(with_ranks, key=lambda r: (r.seed != 0, r.seed if isinstance(r.seed, (int, float)) else 0),
                   default=None)

    @property
    def run_names(self) -> str:
        return "; ".join(r.name for r in self.runs)


def group_runs(runs: Sequence[Run], baseline: Mapping[str, Any]) -> list[Group]:
    """Runs grouped by method, labelled by their difference from the baseline; baseline group first.
    A run without results (e.g. a study clone's empty workspace) joins no group: it is no seed."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        if not run.models:
            continue
        key = method_params(run.params)
        if key not in groups:
            diff = param_diff(run.params, baseline)
            groups[key] = Group(label_for(run.params, diff), diff, dict(run.params), [])
        groups[key].runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.seed if isinstance(r.seed, (int, float)) else 0, r.name))
    return sorted(groups.values(), key=lambda g: (len(g.diff), g.label))


# ------------------------------------------------------------------ a study's plan
@dataclass(frozen=True)
class PlannedRun:
    """A run that a study planned (``DIR/plan.json``): its name and canonical params (the
    report's params file with the run's overrides, :func:`resolve_params`)."""

    name: str
    params: dict[str, Any]

    @property
    def key(self) -> tuple:
        """(method params, seed), as runs are matched (``dmp study`` skips a finished one by it)."""
        return method_params(self.params), self.params.get("seed")


@dataclass
class Missing:
    """A point of a plan (one method) with planned seeds that no run of the report has: the
    report's group of those method params, or an empty group (no run yet) labelled like one."""

    group: Group
    seeds: list


def missing_points(planned: Sequence[PlannedRun], groups: Sequence[Group],
                   baseline: Mapping[str, Any]) -> list[Missing]:
    """The planned runs that no run of ``groups`` is (same method params and seed), by point,
    in the order of the plan's first run of each point."""
    by_key = {method_params(g.params): g for g in groups}
    done = {(key, seed) for key, g in by_key.items() for seed in g.seeds}
    out: dict[tuple, Missing] = {}
    for run in planned:
        key, seed = run.key
        if (key, seed) in done:
            continue
        if key not in out:
            group = by_key.get(key)
            if group is None:
                params = {k: v for k, v in run.params.items() if k != "seed"}
                diff = param_diff(params, baseline)
                group = Group(label_for(params, diff), diff, params, [])
            out[key] = Missing(group, [])
        if seed not in out[key].seeds:
            out[key].seeds.append(seed)
    return list(out.values())


def stale_warnings(workspace_params: Optional[Mapping[str, Any]], baseline: Mapping[str, Any], baseline_source: str,
                   stale_stages: Sequence[str] = ()) -> list[str]:
    """Warning lines for the top of the report: workspace params that differ from HEAD, stale stages."""
    lines = []
    if workspace_params is not None:
        diff = param_diff(workspace_params, baseline, keep_seed=True)
        if diff:
            changes = ", ".join(f"{k}={_fmt_value(k, v)} (baseline {_fmt_value(k, baseline.get(k))})"
                                for k, v in diff.items())
            lines.append(f"The workspace params differ from the baseline ({baseline_source}): {changes}. "
                         "The `workspace` row is that run, not the baseline; commit it, or restore params.yaml "
                         "and `dvc repro`.")
    stale = [s for s in stale_stages if s.split(":")[-1] not in ALWAYS_CHANGED_STAGES]
    if stale:
        lines.append(f"`dvc status`: not up to date: {', '.join(stale)}. The `workspace` row's outputs do not "
                     "match its params or code; run `dvc repro` before reading it.")
    return lines
