"""The research report: ``reports/results.md`` and ``reports/figures/*.png``.

Everything arrives as plain data, so this module knows nothing about DVC, git or MLflow
(``orchestration/runs.py`` gathers it):

- :class:`Run`: one finished run of the pipeline (the workspace, the HEAD commit or a DVC
  experiment) with its resolved params and the files its stages wrote:
  ``reports/evaluate/details.json`` (every recall, diagnostics, split), ``ranks.npz``
  (per-query ranks, for the bootstrap and the chance level), ``metrics.json`` (used only
  when details.json is missing) and ``reports/<stage>/metrics.json`` (steps, epochs).
- the *baseline*: the resolved params of the HEAD commit. Every row is labelled by its
  difference from it (``mamo``, ``denoising (vicreg=false)``); only a run with exactly
  the baseline's params is called "baseline".
- histories (run name -> pretraining loss terms per step) and the retrieval gallery.

Runs that differ only in ``seed`` form one group (mean ± std over seeds). Groups that
differ in exactly one setting are compared with a paired bootstrap over the test split's
independent units (:mod:`dmp_core.stats`): binding groups where ranks.npz has
``clusters`` that join images (the synthetic set), else images. Groups with >= 2 seeds in
common also get the Student t interval of the mean per-seed difference. The verdict
speaks of *recipes* only with >= 3 seeds on each side (and resting on that across-seed
interval); otherwise of "these two checkpoints" or "these N-seed runs". Every number in
the report comes from these inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from dmp_core.config import Config, ParamsError, apply_dotted, config_from_dict, flatten
from dmp_core.errors import DataError
from dmp_core.io import atomic_path, write_text
from dmp_core.seed_results import SEED_RESULTS
from dmp_core.stats import (
    Ranks,
    bootstrap_vs_chance,
    canonical_clusters,
    chance_recall,
    excludes_zero,
    paired_bootstrap,
    seed_interval,
)

RECALLS = [("tr", 1), ("tr", 5), ("tr", 10), ("ir", 1), ("ir", 5), ("ir", 10)]
RECALL_KEYS = [f"{d}_r{k}" for d, k in RECALLS]
MODELS = ("finetune", "pretrain")
MODEL_NAMES = {"finetune": "finetuned", "pretrain": "zero-shot"}
SCORER_NAMES = {"itm": "ITM re-ranked", "itc": "ITC only"}
# params that never make two runs different methods (where things run, how they are logged)
IGNORED_PARAMS = ("seed", "tracking.", "report.", "data.root", "eval.batch_size", "eval.itm_batch_size",
                  "eval.chunk_size", "eval.diag_queries", "eval.diag_pairs", "pretrain.num_workers",
                  "finetune.num_workers", "pretrain.log_every", "finetune.log_every", "pretrain.checkpoint_every",
                  "finetune.checkpoint_every", "targets.batch_size")
# objective keys whose null means "the variant's recipe" (see canonical_params)
RECIPE_KEYS = ("mrm", "mim", "mlm", "itc", "itm", "vicreg", "mim_target", "text_mask_ratio", "itm_negatives")
# stages that run every time (dvc.yaml always_changed), so `dvc status` always lists them
ALWAYS_CHANGED_STAGES = ("params", "download", "report")
# the verdict's floors: ITM that does not order the ITC top-k / does not match at all (per-query
# AUCs), and a fusion that does not use a modality (gaps relative to the matched loss, at the
# common mask ratios eval.gap_*_mask_ratio, so that variants and loss scales compare)
ITM_FLOORS = {"itm_auc": 0.6, "itm_auc_random": 0.6}
GAP_FLOORS = {"image_use_gap_rel": 0.02, "text_use_gap_rel": 0.02}
DIAGNOSTIC_FLOORS = {**ITM_FLOORS, **GAP_FLOORS}
DIAGNOSTIC_NAMES = {"itm_auc": "ITM AUC on the ITC top-k", "itm_auc_random": "ITM AUC vs random negatives",
                    "image_use_gap_rel": "relative image-use gap", "text_use_gap_rel": "relative text-use gap"}
BOOTSTRAP_SEED = 0  # the same resamples every time the report is built
RECIPE_MIN_SEEDS = 3  # seeds (run by both methods) before the verdict speaks of recipes


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
            if scorer not in SCORER_NAMES or not rest:
                scorer, rest = "itm", key  # the headline scorer's numbers carry no prefix
            models.setdefault(model, {}).setdefault(scorer, {})[rest] = float(value)
    for key, value in dict((metrics or {}).get("diagnostics") or {}).items():
        model, _, name = key.partition("_")
        if model in MODELS and name:
            models.setdefault(model, {}).setdefault("diagnostics", {})[name] = value
    return models


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
        return str((self.details or {}).get("headline_scorer") or "itm")

    def recall(self, model: str, key: str, scorer: Optional[str] = None) -> Optional[float]:
        value = self.models.get(model, {}).get(scorer or self.headline, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def diagnostics(self, model: str) -> dict[str, Any]:
        return dict(self.models.get(model, {}).get("diagnostics") or {})

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

    @property
    def fraction(self) -> Any:
        return self.params.get("data.fraction")

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
    """Runs grouped by method, labelled by their difference from the baseline; baseline group first."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = method_params(run.params)
        if key not in groups:
            diff = param_diff(run.params, baseline)
            groups[key] = Group(label_for(run.params, diff), diff, dict(run.params), [])
        groups[key].runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.seed if isinstance(r.seed, (int, float)) else 0, r.name))
    return sorted(groups.values(), key=lambda g: (len(g.diff), g.label))


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


# ------------------------------------------------------------------ formatting
def _mean_std(values: Sequence[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _signed(value: float) -> str:
    value = 0.0 if round(value, 1) == 0 else value  # no "−0.0"
    return f"{value:+.1f}".replace("-", "−")


def _interval(result: Mapping[str, float]) -> str:
    return f"{_signed(result['diff'])} [{_signed(result['lo'])}, {_signed(result['hi'])}]"


def _n_seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def bootstrap_unit(clusters: Optional[np.ndarray], n_images: int) -> str:
    """The resampled unit, in words: ``binding groups (C clusters of N images)`` or ``images (N)``."""
    n_clusters = n_images if clusters is None else int(np.max(clusters)) + 1
    if n_clusters == n_images:
        return f"images ({n_images})"
    return f"binding groups ({n_clusters} clusters of {n_images} images)"


def _seed_ci_text(ci: Mapping[str, float]) -> str:
    """``+1.2 [−0.3, +2.7] (t, 2 dof)``: the mean per-seed difference and its Student t interval."""
    return f"{_signed(ci['diff'])} [{_signed(ci['lo'])}, {_signed(ci['hi'])}] (t, {ci['dof']} dof)"


def _seeds_cell(group: Group) -> str:
    return f"{len(group.runs)} ({', '.join(str(s) for s in group.seeds)})"


def _md(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True)  # keep "25.0", "–" as written


def _split_text(split: Mapping[str, Any]) -> str:
    images, texts = split.get("images"), split.get("texts")
    size = f", {images} images / {texts} captions" if images and texts else ""
    return f"{split.get('dataset')} {split.get('name') or 'test'}{size}"


# ------------------------------------------------------------------ tables
def _at_base_fraction(groups: Sequence[Group]) -> list[Group]:
    return [g for g in groups if "data.fraction" not in g.diff]


def chance_levels(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The exact chance recall of every distinct test split among the runs (stats.chance_recall of txt2img)."""
    out: dict[tuple, dict] = {}
    for run in runs:
        split = run.split
        key = (split.get("dataset"), split.get("name"), split.get("images"), split.get("texts"))
        if key in out and out[key]["source"] == "ranks.npz":
            continue
        if run.txt2img is not None:
            out[key] = {"split": split, "chance": chance_recall(run.txt2img), "source": "ranks.npz"}
        elif (run.details or {}).get("chance") and key not in out:
            out[key] = {"split": split, "chance": dict(run.details["chance"]), "source": "details.json"}
    return list(out.values())


def main_table(groups: Sequence[Group], runs: Sequence[Run], include_seed_numbers: bool = True) -> pd.DataFrame:
    """One row per method and model (finetuned, zero-shot), the chance level of each split, the seed paper's rows."""
    rows = []
    for model in MODELS:
        for group in _at_base_fraction(groups):
            if not any(r.models.get(model) for r in group.runs):
                continue
            first = group.runs[0]
            split = first.split
            row = {"Method": group.label, "Model": MODEL_NAMES[model], "Dataset": split.get("dataset"),
                   "Image size": f"{split.get('image_size')} px", "Scorer": SCORER_NAMES.get(first.headline, first.headline),
                   "Seeds": _seeds_cell(group)}
            for key in RECALL_KEYS:
                row[_col(key)] = _mean_std(group.values(model, key))
            row["R mean"] = _mean_std(group.values(model, "r_mean"))
            row["ITC R mean"] = _mean_std(group.values(model, "r_mean", "itc"))
            row["Runs"] = group.run_names
            rows.append(row)
    for level in chance_levels(runs):
        split, chance = level["split"], level["chance"]
        row = {"Method": "chance (random ranking, exact)", "Model": "–", "Dataset": split.get("dataset"),
               "Image size": "–", "Scorer": "any", "Seeds": "–"}
        for key in RECALL_KEYS:
            row[_col(key)] = f"{chance[key]:.2f}"
        row["R mean"] = row["ITC R mean"] = f"{chance['r_mean']:.2f}"
        row["Runs"] = f"{_split_text(split)} (from {level['source']})"
        rows.append(row)
    if include_seed_numbers:
        for res in SEED_RESULTS:
            row = {"Method": res["method"], "Model": "finetuned", "Dataset": res["dataset"], "Image size": "–",
                   "Scorer": res["protocol"], "Seeds": "–"}
            for key in RECALL_KEYS:
                row[_col(key)] = f"{res[key]:g}"
            row["R mean"] = f"{np.mean([res[k] for k in RECALL_KEYS]):.1f}"
            row["ITC R mean"] = "–"
            row["Runs"] = f"{res['source']}; {res['pretraining']}"
            rows.append(row)
    return pd.DataFrame(rows)


def _col(key: str) -> str:
    """``tr_r1`` -> ``TR R@1``."""
    direction, _, k = key.partition("_r")
    return f"{direction.upper()} R@{k}"


def diagnostics_table(groups: Sequence[Group]) -> pd.DataFrame:
    """ITM AUC and the modality-use gaps of every run and model (details.json, else metrics.json)."""
    rows = []
    for group in groups:
        for run in group.runs:
            for model in MODELS:
                diag = run.diagnostics(model)
                if not diag:
                    continue
                flags = _diagnostic_flags(diag)
                rows.append({
                    "Run": run.name, "Method": group.label, "Model": MODEL_NAMES[model],
                    "ITM AUC top-k [95% CI]": _with_ci(diag, "itm_auc"),
                    "ITM AUC random [95% CI]": _with_ci(diag, "itm_auc_random"),
                    "image-use gap, nats (rel.)": _with_rel(diag, "image_use_gap"),
                    "text-use gap (rel.)": _with_rel(diag, "text_use_gap"),
                    "MLM loss matched / shuffled": _pair(diag.get("mlm_loss_matched"), diag.get("mlm_loss_shuffled")),
                    "below floor": "; ".join(flags) or "–",
                })
    return pd.DataFrame(rows)


def _with_ci(diag: Mapping[str, Any], key: str) -> str:
    lo, hi = diag.get(f"{key}_lo"), diag.get(f"{key}_hi")
    ci = f" [{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) else ""
    return _fmt_num(diag.get(key), 3) + ci


def _with_rel(diag: Mapping[str, Any], key: str) -> str:
    rel = diag.get(f"{key}_rel")
    return _fmt_num(diag.get(key), 3) + (f" ({rel:.1%})" if isinstance(rel, float) else "")


def _fmt_num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _pair(a: Any, b: Any) -> str:
    return "–" if a is None and b is None else f"{_fmt_num(a, 3)} / {_fmt_num(b, 3)}"


def _diagnostic_flags(diag: Mapping[str, Any], floors: Mapping[str, float] = DIAGNOSTIC_FLOORS) -> list[str]:
    flags = []
    for key, floor in floors.items():
        value = diag.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < floor:
            flags.append(f"{DIAGNOSTIC_NAMES[key]} {value:.3f} < {floor:g}")
    return flags


# ------------------------------------------------------------------ statistics
@dataclass
class Comparison:
    """Group ``a`` minus group ``b``, which differ in exactly one setting."""

    a: Group
    b: Group
    setting: str
    run_a: Optional[Run] = None
    run_b: Optional[Run] = None
    result: Optional[dict[str, dict[str, float]]] = None  # paired_bootstrap of the finetuned headline ranks
    why_not: str = ""
    per_seed: Optional[list[float]] = None  # r_mean differences of the seeds both groups ran
    seed_ci: Optional[dict[str, float]] = None  # stats.seed_interval of per_seed (>= 2 common seeds)
    unit: str = ""  # the bootstrap's resampled unit, in words (bootstrap_unit)

    @property
    def title(self) -> str:
        return f"{self.a.label} − {self.b.label}"


# variants in the order of their differences (denoising − MAMO, denoising − frozen, MAMO − frozen)
VARIANT_ORDER = ("denoising", "mamo", "frozen")
VARIANT_NAMES = {"denoising": "denoising", "mamo": "MAMO", "frozen": "frozen towers"}


def _variant_rank(group: Group) -> int:
    return VARIANT_ORDER.index(group.variant) if group.variant in VARIANT_ORDER else len(VARIANT_ORDER)


def _order(a: Group, b: Group, key: str, baseline: Mapping[str, Any]) -> tuple[Group, Group]:
    """denoising − mamo (− frozen) for the variant; otherwise the changed setting minus its base."""
    if key == "objective.variant":
        return (a, b) if _variant_rank(a) <= _variant_rank(b) else (b, a)
    if b.params.get(key) != baseline.get(key) and a.params.get(key) == baseline.get(key):
        return b, a
    if a.params.get(key) != baseline.get(key) and b.params.get(key) == baseline.get(key):
        return a, b
    va, vb = a.params.get(key), b.params.get(key)
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
        return (a, b) if va >= vb else (b, a)
    return (a, b) if str(va) >= str(vb) else (b, a)


def comparisons(groups: Sequence[Group], baseline: Mapping[str, Any], n_samples: int,
                seed: int = BOOTSTRAP_SEED) -> list[Comparison]:
    """Every pair of groups that differ in exactly one setting, with its paired bootstrap."""
    out = []
    for g1, g2 in combinations(groups, 2):
        keys = [k for k in set(g1.params) | set(g2.params)
                if not _ignored(k) and g1.params.get(k) != g2.params.get(k)]
        if len(keys) != 1:
            continue
        a, b = _order(g1, g2, keys[0], baseline)
        comp = Comparison(a, b, keys[0], a.representative(), b.representative())
        if comp.run_a is None or comp.run_b is None:
            missing = a.label if comp.run_a is None else b.label
            comp.why_not = f"no ranks.npz for {missing}"
        elif not np.array_equal(comp.run_a.txt2img, comp.run_b.txt2img):
            comp.why_not = "different test splits"
        else:
            # the clusters belong to the split, not the model: one run's suffice (older outputs lack them)
            clusters_a, clusters_b = comp.run_a.clusters, comp.run_b.clusters
            if clusters_a is not None and clusters_b is not None and not np.array_equal(clusters_a, clusters_b):
                comp.why_not = "different test splits (their binding groups differ)"
            else:
                clusters = clusters_a if clusters_a is not None else clusters_b
                comp.unit = bootstrap_unit(clusters, int(comp.run_a.txt2img.max()) + 1)
                comp.result = paired_bootstrap(comp.run_a.model_ranks("finetune"), comp.run_b.model_ranks("finetune"),
                                               comp.run_a.txt2img, n_samples=n_samples, seed=seed, clusters=clusters)
        seeds_a = {r.seed: r.recall("finetune", "r_mean") for r in a.runs}
        seeds_b = {r.seed: r.recall("finetune", "r_mean") for r in b.runs}
        common = [s for s in seeds_a if s in seeds_b and seeds_a[s] is not None and seeds_b[s] is not None]
        if len(a.runs) > 1 and len(b.runs) > 1 and len(common) > 1:
            comp.per_seed = [seeds_a[s] - seeds_b[s] for s in common]
            comp.seed_ci = seed_interval(comp.per_seed)
        out.append(comp)
    return out


def statistics_table(comps: Sequence[Comparison]) -> pd.DataFrame:
    rows = []
    for comp in comps:
        scorer = SCORER_NAMES.get(comp.run_a.headline, comp.run_a.headline) if comp.run_a else "–"
        row = {"A − B": comp.title, "setting": _short(comp.setting), "scorer": f"finetuned, {scorer}",
               "runs (A vs B)": f"{comp.run_a.name if comp.run_a else '–'} vs {comp.run_b.name if comp.run_b else '–'}"}
        for key in (*RECALL_KEYS, "r_mean"):
            row[_col(key) if key != "r_mean" else "R mean"] = _interval(comp.result[key]) if comp.result else "–"
        row["R mean CI excludes 0"] = ("yes" if excludes_zero(comp.result["r_mean"]) else "no") if comp.result \
            else comp.why_not
        row["bootstrap unit"] = comp.unit or "–"
        row["per-seed Δ R mean"] = (f"{np.mean(comp.per_seed):+.1f} ± {np.std(comp.per_seed, ddof=1):.1f} "
                                    f"({len(comp.per_seed)} seeds)").replace("-", "−") if comp.per_seed else "–"
        row["across-seed 95% CI of Δ R mean"] = _seed_ci_text(comp.seed_ci) if comp.seed_ci else "–"
        row["seed CI excludes 0"] = ("yes" if excludes_zero(comp.seed_ci) else "no") if comp.seed_ci else "–"
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class ChanceTest:
    run: Run
    label: str
    model: str
    result: dict[str, dict[str, float]]  # bootstrap_vs_chance
    unit: str = ""  # the bootstrap's resampled unit, in words


def chance_tests(groups: Sequence[Group], n_samples: int, seed: int = BOOTSTRAP_SEED) -> list[ChanceTest]:
    """Every run's models (headline scorer) against the chance level of their split."""
    out = []
    for group in groups:
        for run in group.runs:
            for model in MODELS:
                ranks = run.model_ranks(model)
                if ranks is not None:
                    clusters = run.clusters
                    result = bootstrap_vs_chance(ranks, run.txt2img, n_samples=n_samples, seed=seed, clusters=clusters)
                    out.append(ChanceTest(run, group.label, model, result,
                                          bootstrap_unit(clusters, len(ranks.tr))))
    return out


def chance_table(tests: Sequence[ChanceTest]) -> pd.DataFrame:
    rows = []
    for test in tests:
        r = test.result["r_mean"]
        rows.append({"Run": test.run.name, "Method": test.label, "Model": MODEL_NAMES[test.model],
                     "Scorer": SCORER_NAMES.get(test.run.headline, test.run.headline),
                     "R mean": f"{r['value']:.1f}", "chance R mean": f"{r['chance']:.2f}",
                     "R mean − chance [95% CI]": _interval(r), "excludes chance": "yes" if r["lo"] > 0 else "no",
                     "bootstrap unit": test.unit or "–"})
    return pd.DataFrame(rows)


def _group_seeds(group: Group) -> int:
    return len({r.seed for r in group.runs})


def _subject(comp: Comparison, name_a: str, name_b: str) -> str:
    """What a claim without recipe-level evidence is about, with the seed counts."""
    na, nb = _group_seeds(comp.a), _group_seeds(comp.b)
    if na == nb == 1:
        return "these two checkpoints (1 seed each)"
    if na == nb:
        return f"these {na}-seed runs ({na} seeds each)"
    return f"these {na}-seed and {nb}-seed runs ({name_a} {_n_seeds(na)}, {name_b} {_n_seeds(nb)})"


def _variant_sentence(comp: Comparison) -> str:
    """The denoising − MAMO part of the verdict (or denoising / MAMO − frozen towers).

    Recipes are compared only when both ran >= RECIPE_MIN_SEEDS common seeds: the claim
    then rests on the across-seed t interval, and the bootstrap interval (one pair of
    checkpoints) is named as the within-test-set uncertainty. Otherwise the claim is
    about these checkpoints / these N-seed runs, with the seed counts.
    """
    na, nb = _group_seeds(comp.a), _group_seeds(comp.b)
    name_a, name_b = (VARIANT_NAMES.get(str(g.variant), str(g.variant)) for g in (comp.a, comp.b))
    title = f"{name_a[0].upper()}{name_a[1:]} − {name_b}"
    rest = describe_diff(comp.a.diff, skip=("objective.variant",))
    where = f" at {rest}" if rest else ""
    scorer = SCORER_NAMES.get(comp.run_a.headline, "") if comp.run_a else ""
    ci = comp.seed_ci
    runs = f"runs {comp.run_a.name} vs {comp.run_b.name}" if comp.run_a and comp.run_b else ""
    if ci is not None and ci["n"] >= RECIPE_MIN_SEEDS:
        better = (f"{name_a} is better than {name_b} as a recipe" if ci["diff"] > 0
                  else f"{name_b} is better than {name_a} as a recipe")
        claim = f"excludes 0: {better}" if excludes_zero(ci) else \
            "includes 0: no difference between the recipes can be claimed"
        text = (f"{title}{where} as recipes (finetuned, {scorer}; {name_a} {_n_seeds(na)}, {name_b} "
                f"{_n_seeds(nb)}): over the {ci['n']} seeds both ran, the R mean difference is "
                f"{_signed(ci['diff'])} ± {ci['std']:.1f} (mean ± std), 95% t interval over seeds "
                f"[{_signed(ci['lo'])}, {_signed(ci['hi'])}] ({ci['dof']} dof); the across-seed interval {claim} "
                f"(on this test split).")
        if comp.result is not None:
            r = comp.result["r_mean"]
            text += (f" The within-test-set uncertainty of one pair of checkpoints ({runs}): paired bootstrap over "
                     f"{comp.unit}, R mean {_signed(r['diff'])} points, 95% CI [{_signed(r['lo'])}, "
                     f"{_signed(r['hi'])}] (it does not include seed-to-seed variation).")
        else:
            text += f" The within-test-set (bootstrap) interval is missing: {comp.why_not}."
        return text
    subject = _subject(comp, name_a, name_b)
    if comp.result is None:
        text = f"{title} ({comp.title}; {subject}) has no interval: {comp.why_not}."
    else:
        r = comp.result["r_mean"]
        claim = ("excludes 0: " + (f"{name_a} is better" if r["diff"] > 0 else f"{name_b} is better")
                 + f" for {subject} on this test split") if excludes_zero(r) else \
            f"includes 0: no difference can be claimed for {subject}"
        text = (f"{title}{where} (finetuned, {scorer}, {runs}): R mean {_signed(r['diff'])} points, "
                f"95% CI [{_signed(r['lo'])}, {_signed(r['hi'])}] (paired bootstrap over {comp.unit}); "
                f"the interval {claim}.")
    if ci is not None:
        text += (f" Over the {ci['n']} seeds both ran, the R mean difference is {_signed(ci['diff'])} ± "
                 f"{ci['std']:.1f}, 95% t interval [{_signed(ci['lo'])}, {_signed(ci['hi'])}] ({ci['dof']} dof), "
                 f"which {'excludes' if excludes_zero(ci) else 'includes'} 0.")
    common = ci["n"] if ci is not None else 0
    if min(na, nb) >= RECIPE_MIN_SEEDS:
        text += (f" This is not a claim about the recipes: that needs >= {RECIPE_MIN_SEEDS} seeds run by both "
                 f"({common} in common).")
    else:
        text += (f" This is not a claim about the recipes: that needs >= {RECIPE_MIN_SEEDS} seeds of each "
                 f"({name_a} {na}, {name_b} {nb}).")
    return text


def verdict(groups: Sequence[Group], comps: Sequence[Comparison], tests: Sequence[ChanceTest],
            levels: Sequence[Mapping[str, Any]]) -> str:
    """A paragraph generated from the numbers: the variant difference, re-ranking, diagnostics, chance."""
    sentences = []
    variant = [c for c in comps if c.setting == "objective.variant"]
    for comp in variant:
        sentences.append(_variant_sentence(comp))
    if not variant:
        sentences.append("No denoising − MAMO interval: no two runs differ only in objective.variant.")
    for group in groups:
        for run in group.runs:
            if run.headline != "itm":
                continue
            itm, itc = run.recall("finetune", "r_mean", "itm"), run.recall("finetune", "r_mean", "itc")
            if itm is not None and itc is not None and itm <= itc:
                sentences.append(f"ITM re-ranking does not beat ITC-only for {run.name} ({group.label}): finetuned "
                                 f"R mean {itm:.1f} re-ranked vs {itc:.1f} ITC-only.")
            for model in MODELS:
                diag = run.diagnostics(model)
                where = f"{run.name} ({group.label}, {MODEL_NAMES[model]})"
                itm_flags, gap_flags = _diagnostic_flags(diag, ITM_FLOORS), _diagnostic_flags(diag, GAP_FLOORS)
                if itm_flags:
                    sentences.append(f"The ITM head of {where} is below its floor: {', '.join(itm_flags)}.")
                if gap_flags:
                    sentences.append(f"The fusion of {where} is not using a modality: {', '.join(gap_flags)}.")
    for level in levels:
        sentences.append(f"Chance R mean on {_split_text(level['split'])} is {level['chance']['r_mean']:.2f}.")
    if tests:
        below = [f"{t.run.name} ({MODEL_NAMES[t.model]})" for t in tests if not t.result["r_mean"]["lo"] > 0]
        if below:
            sentences.append(f"The R mean interval of {', '.join(below)} does not exclude chance; "
                             f"{len(tests) - len(below)} of {len(tests)} models' intervals lie above it.")
        else:
            sentences.append(f"All {len(tests)} models' R mean intervals lie above chance.")
    else:
        sentences.append("No model was tested against chance (no ranks.npz).")
    return " ".join(sentences)


# ------------------------------------------------------------------ data scaling
SCALING_KEYS = ("objective.variant", "data.fraction")


def scaling_sets(groups: Sequence[Group]) -> list[tuple[str, list[Group]]]:
    """Sets of groups that differ from each other only in variant and data.fraction, with >= 2 fractions.

    Each set is named by its other settings' difference from the baseline (a scaling
    study run with ``-S pretrain.epochs=1 -S pretrain.steps=null`` is its own set).
    """
    sets: dict[tuple, list[Group]] = {}
    for group in groups:
        key = tuple(item for item in method_params(group.params) if item[0] not in SCALING_KEYS)
        sets.setdefault(key, []).append(group)
    out = []
    for members in sets.values():
        if len({g.fraction for g in members}) >= 2:
            name = describe_diff(members[0].diff, skip=SCALING_KEYS) or "baseline settings"
            out.append((name, sorted(members, key=lambda g: (str(g.variant), g.fraction))))
    return sorted(out, key=lambda item: item[0] != "baseline settings")


def _values_cell(values: Sequence[Any]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    unique = sorted(set(values))
    return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in unique)


def scaling_table(groups: Sequence[Group]) -> pd.DataFrame:
    """Rows by variant x data.fraction, with the steps and epochs each run actually trained."""
    rows = []
    for name, members in scaling_sets(groups):
        for group in members:
            first = group.runs[0]
            row = {"Settings": name, "Variant": group.variant, "data.fraction": f"{group.fraction:g}",
                   "Scorer": f"finetuned, {SCORER_NAMES.get(first.headline, first.headline)}",
                   "Seeds": _seeds_cell(group)}
            for stage in ("pretrain", "finetune"):
                row[f"{stage} steps"] = _values_cell([r.training_value(stage, "steps") for r in group.runs])
                row[f"{stage} epochs"] = _values_cell([r.training_value(stage, "epochs") for r in group.runs])
            for key in ("tr_r1", "ir_r1"):
                row[_col(key)] = _mean_std(group.values("finetune", key))
            row["R mean"] = _mean_std(group.values("finetune", "r_mean"))
            row["Runs"] = group.run_names
            rows.append(row)
    return pd.DataFrame(rows)


def _policy(runs: Sequence[Run]) -> str:
    parts = []
    for stage in ("pretrain", "finetune"):
        steps = {r.params.get(f"{stage}.steps") for r in runs}
        epochs = {r.params.get(f"{stage}.epochs") for r in runs}
        if None not in steps and len(steps) == 1:
            parts.append(f"{stage}: equal optimiser steps ({stage}.steps={steps.pop()} at every fraction, so smaller "
                         "fractions repeat their data for more epochs)")
        elif None not in epochs and len(epochs) == 1:
            parts.append(f"{stage}: equal epochs ({stage}.epochs={epochs.pop()} at every fraction, so smaller "
                         "fractions train fewer steps: data and compute are confounded)")
        else:
            parts.append(f"{stage}: mixed training lengths across runs (see the steps and epochs columns)")
    return "; ".join(parts)


def scaling_policy(groups: Sequence[Group]) -> str:
    """Which training length each scaling set shares: equal optimiser steps, equal epochs, or neither."""
    sets = scaling_sets(groups)
    if len(sets) == 1:
        return f"Training-length policy: {_policy([r for g in sets[0][1] for r in g.runs])}."
    return "Training-length policy: " + " | ".join(
        f"{name}: {_policy([r for g in members for r in g.runs])}" for name, members in sets) + "."


# ------------------------------------------------------------------ plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    plt = _figure()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


def loss_columns(history: pd.DataFrame) -> dict[str, str]:
    """History column -> loss-term name (``loss`` for the total), whatever the prefix (train/...)."""
    out = {}
    for col in history.columns:
        prefix, _, short = str(col).replace("/", ".").rpartition(".")
        if prefix not in ("", "train", "pretrain", "pretrain.train"):
            continue  # validation curves and other stages stay out of the training-loss panels
        if short == "loss" or short.startswith("loss_"):
            out[col] = short
    return out


def plot_losses(histories: Mapping[str, pd.DataFrame], labels: Mapping[str, str], path: Path) -> Path | None:
    """One panel per loss term, one line per group (mean over its seeds at each step)."""
    curves: dict[str, dict[str, list[pd.Series]]] = {}  # term -> label -> one series per run
    for name, history in histories.items():
        if history is None or history.empty:
            continue
        steps = history["step"] if "step" in history else pd.Series(np.arange(len(history)))
        for col, term in loss_columns(history).items():
            series = pd.Series(pd.to_numeric(history[col], errors="coerce").to_numpy(dtype=float),
                               index=steps.to_numpy()).dropna()
            series = series.groupby(level=0).mean()  # one value per step
            if series.empty:
                continue
            curves.setdefault(term, {}).setdefault(labels.get(name, name), []).append(series)
    if not curves:
        return None
    plt = _figure()
    terms = sorted(curves, key=lambda t: (t != "loss", t))
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    all_labels = sorted({label for by_label in curves.values() for label in by_label})
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(all_labels)}  # same colour in every panel
    for ax, term in zip(axes.flat, terms):
        for label, series_list in sorted(curves[term].items()):
            mean = pd.concat(series_list, axis=1).mean(axis=1).sort_index()
            ax.plot(mean.index, mean.to_numpy(), label=label, linewidth=1.2, color=colours[label])
        ax.set_title("total loss" if term == "loss" else term.removeprefix("loss_").upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[label], label=label) for label in all_labels]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(handles) / 4)))
    fig.suptitle("Pretraining loss terms (mean over seeds; a term is absent where a variant does not use it)", y=1.02)
    fig.tight_layout()
    return _save(fig, path)


def plot_scaling(groups: Sequence[Group], path: Path) -> Path | None:
    sets = scaling_sets(groups)
    if not sets:
        return None
    keep = [g for _, members in sets for g in members]
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    for ax, key, title in zip(axes.flat, ("ir_r1", "tr_r1"), ("image retrieval R@1", "text retrieval R@1")):
        for name, members in sets:
            for variant in sorted({str(g.variant) for g in members}):
                points = sorted((g.fraction, g.values("finetune", key)) for g in members if str(g.variant) == variant)
                points = [(f, v) for f, v in points if v]
                if not points:
                    continue
                means = [np.mean(v) for _, v in points]
                stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in points]
                label = variant if len(sets) == 1 else f"{variant} ({name})"
                ax.errorbar([f for f, _ in points], means, yerr=stds, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("data.fraction (training images)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    scorer = SCORER_NAMES.get(keep[0].runs[0].headline, "")
    axes.flat[0].set_ylabel(f"R@1 (%), finetuned, {scorer}")
    axes.flat[0].legend()
    return _save(fig, path)


def plot_ablations(groups: Sequence[Group], path: Path) -> Path | None:
    keep = [g for g in _at_base_fraction(groups) if g.values("finetune", "ir_r1") and g.values("finetune", "tr_r1")]
    if len(keep) < 2:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(keep)), 3.6))
    x = np.arange(len(keep))
    width = 0.38
    for j, (title, key) in enumerate((("IR R@1", "ir_r1"), ("TR R@1", "tr_r1"))):
        values = [g.values("finetune", key) for g in keep]
        ax.bar(x + (j - 0.5) * width, [np.mean(v) for v in values], width,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values], capsize=3, label=title)
    ax.set_xticks(x, [g.label for g in keep], rotation=25, ha="right", fontsize=8)
    scorer = SCORER_NAMES.get(keep[0].runs[0].headline, "")
    ax.set_ylabel(f"R@1 (%), finetuned, {scorer}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------ gallery
GALLERY_DPI = 100
MIN_DISPLAY_PX, MAX_DISPLAY_PX = 96, 224  # real photos are legible at 96-224 px


@dataclass
class GalleryData:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # one per caption id
    txt2img: np.ndarray  # [M]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (i2t, t2i), ITM re-ranked
    dataset: str = "?"
    split: str = "test"


def load_gallery(scores_npz: str | Path, split_dir: str | Path, dataset: str = "?") -> GalleryData:
    """Scores of every model in reports/evaluate/scores.npz and the split's images/captions."""
    scores_npz, split_dir = Path(scores_npz), Path(split_dir)
    for path in (scores_npz, split_dir / "images.npy", split_dir / "captions.parquet"):
        if not path.is_file():
            raise DataError(f"{path}: missing (run the evaluate stage)")
    with np.load(scores_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    models = sorted({k[: -len("_i2t")] for k in arrays if k.endswith("_i2t") and not k.endswith("itc_i2t")},
                    key=lambda m: (MODELS[::-1].index(m) if m in MODELS else len(MODELS), m))
    scores = {m: (arrays[f"{m}_i2t"], arrays[f"{m}_t2i"]) for m in models if f"{m}_t2i" in arrays}
    if not scores:
        scores = {"final": (arrays["i2t"], arrays["t2i"])}
    captions = pd.read_parquet(split_dir / "captions.parquet").sort_values("caption_id")
    text_col = "raw" if "raw" in captions else "clean"
    return GalleryData(
        images=np.load(split_dir / "images.npy", mmap_mode="r"),
        captions=captions[text_col].astype(str).tolist(),
        txt2img=arrays["txt2img"],
        scores=scores,
        dataset=dataset,
        split=split_dir.name,
    )


def gallery_scale(image_px: int) -> float:
    """Display scale of gallery images: 1 (pixel for pixel) from 96 to 224 px, an integer
    enlargement below (nearest neighbour, said in the caption), a reduction above."""
    if image_px < MIN_DISPLAY_PX:
        return float(math.ceil(MIN_DISPLAY_PX / image_px))
    if image_px > MAX_DISPLAY_PX:
        return MAX_DISPLAY_PX / image_px
    return 1.0


def gallery_caption(data: GalleryData) -> str:
    """Names the dataset, the image size and how the images are shown."""
    h, w = data.images.shape[1:3]
    scale = gallery_scale(max(h, w))
    if scale > 1:
        how = f"shown enlarged {scale:g}× (nearest neighbour, {int(w * scale)} px on screen)"
    elif scale < 1:
        how = f"shown reduced to {int(round(w * scale))} px"
    else:
        how = "shown pixel for pixel"
    return f"{data.dataset} {data.split} split, images {w}×{h} px, {how}"


def plot_gallery(data: GalleryData, model: str, path: Path, queries: int = 4, top: int = 5) -> Path:
    """Top-``top`` images for a few captions (gold framed green) and top captions for a few images.

    Axes are placed in inches at a fixed dpi so that an image cell is exactly the
    image's display size (:func:`gallery_scale`).
    """
    import textwrap

    from matplotlib.patches import Rectangle

    plt = _figure()
    i2t, t2i = data.scores[model]
    text_q = _query_ids(t2i.shape[0], queries)
    image_q = _query_ids(i2t.shape[0], queries)
    top = min(top, i2t.shape[0], i2t.shape[1])
    h, w = data.images.shape[1:3]
    scale = gallery_scale(max(h, w))
    cell_w, cell_h = w * scale / GALLERY_DPI, h * scale / GALLERY_DPI  # inches
    pad, title_h, text_w, head = 0.08, 0.22, 2.6, 0.55
    rows = len(text_q) + len(image_q)
    fig_w = text_w + top * (cell_w + pad) + pad
    fig_w = max(fig_w, text_w + cell_w + 6.0)
    fig_h = head + rows * (cell_h + title_h + pad)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=GALLERY_DPI)
    interpolation = "nearest" if scale >= 1 else "antialiased"

    def axes_at(x: float, y_top: float, width: float, height: float):
        return fig.add_axes((x / fig_w, 1 - (y_top + height) / fig_h, width / fig_w, height / fig_h))

    def show(ax, img: int, gold: bool = False) -> None:
        ax.imshow(np.asarray(data.images[img]), interpolation=interpolation)
        ax.set_xticks([]), ax.set_yticks([])
        if gold:
            ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor="limegreen", linewidth=4))

    for r, t in enumerate(text_q):
        y = head + r * (cell_h + title_h + pad) + title_h
        ax = axes_at(pad, y, text_w - 2 * pad, cell_h)
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(textwrap.wrap(f"“{data.captions[t]}”", 34)), va="center", fontsize=8)
        for c, img in enumerate(np.argsort(-t2i[t], kind="stable")[:top]):
            gold = img == data.txt2img[t]
            ax = axes_at(text_w + c * (cell_w + pad), y, cell_w, cell_h)
            show(ax, int(img), gold)
            ax.set_title(f"#{c + 1}" + (" gold" if gold else ""), fontsize=7, color="green" if gold else "black")
    for r, img in enumerate(image_q, start=len(text_q)):
        y = head + r * (cell_h + title_h + pad) + title_h
        ax = axes_at(pad, y, cell_w, cell_h)
        show(ax, img)
        ax.set_title(f"image {img}", fontsize=7)
        ax = axes_at(pad + cell_w + 0.2, y, fig_w - cell_w - 0.4, cell_h)
        ax.axis("off")
        ranked = np.argsort(-i2t[img], kind="stable")[:top]
        for c, t in enumerate(ranked):
            gold = data.txt2img[t] == img
            line = f"{c + 1}. {'✓ ' if gold else ''}{textwrap.shorten(data.captions[t], 90)}"
            ax.text(0.0, 1 - (c + 0.5) / top, line, va="center", fontsize=8,
                    color="green" if gold else "black", weight="bold" if gold else "normal")
    title = (f"Retrieval gallery: {model} ({SCORER_NAMES['itm']}), {gallery_caption(data)}. "
             f"Rows 1-{len(text_q)}: caption → images; then image → captions. Gold in green.")
    fig.text(pad / fig_w, 1 - 0.06 / fig_h, "\n".join(textwrap.wrap(title, int(fig_w * 15))), fontsize=8,
             va="top", ha="left")
    return _save(fig, path, dpi=GALLERY_DPI, tight=False)


def _query_ids(n: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(count, n))})


# ------------------------------------------------------------------ provenance
def provenance_table(groups: Sequence[Group], baseline: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for group in groups:
        for run in group.runs:
            diff = describe_diff(param_diff(run.params, baseline))
            rows.append({
                "run": run.name, "method": group.label, "seed": run.seed, "commit": run.rev or "–",
                "differs from baseline": diff or "nothing (baseline params)",
                "pretrain MLflow run": run.run_ids.get("pretrain", "–"),
                "finetune MLflow run": run.run_ids.get("finetune", "–"),
                "notes": "; ".join(run.notes + run.missing) or "–",
            })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ the report
MODEL_TITLES = {"pretrain": "after pretraining (zero-shot)", "finetune": "after finetuning"}


def build_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    *,
    baseline: Mapping[str, Any],
    baseline_source: str = "HEAD params.yaml",
    warnings: Sequence[str] = (),
    histories: Mapping[str, pd.DataFrame] | None = None,
    gallery: GalleryData | None = None,
    no_gallery: str = "reports/evaluate/scores.npz or the prepared test split is missing",
    gallery_run: str = "workspace",
    gallery_queries: int = 4,
    include_seed_numbers: bool = True,
    bootstrap_samples: int = 2000,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``<out_dir>/results.md`` and ``<out_dir>/figures/*.png``; return the markdown path.

    ``warnings`` go at the very top (stale workspace, see :func:`stale_warnings`);
    ``notes`` are lines on where the data came from. Every table or plot without data
    is replaced by a sentence saying why.
    """
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = merge_duplicates(runs)
    groups = group_runs(runs, baseline)
    comps = comparisons(groups, baseline, bootstrap_samples)
    tests = chance_tests(groups, bootstrap_samples)
    levels = chance_levels(runs)

    lines = ["# Results", ""]
    lines += [f"> **Warning:** {w}" for w in warnings]
    if warnings:
        lines.append("")
    lines += [f"Generated by `dmp report` from reports/evaluate/details.json and ranks.npz of every run (the "
              f"workspace, the HEAD commit and every DVC experiment). Recall in %; mean ± std over seeds. "
              f"Each method is named by how its resolved params differ from the baseline, the params of "
              f"{baseline_source}; \"(baseline)\" marks runs with exactly those params.", ""]
    notes = list(notes) + [f"Run {run.name}: {'; '.join(run.missing)}." for run in runs if run.missing]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")

    def section(title: str, table: pd.DataFrame, empty: str, text: str = "", level: str = "##") -> None:
        lines.extend([f"{level} {title}", ""])
        if text:
            lines.extend([text, ""])
        lines.extend([_md(table) if not table.empty else empty, ""])

    def figure(title: str, path: Path | None, missing: str, caption: str = "") -> None:
        lines.extend([f"### {title}", ""])
        lines.extend([f"![{title}](figures/{path.name})" if path else missing, ""])
        if path and caption:
            lines.extend([caption, ""])

    if not runs:
        lines += ["No finished runs: run `dvc repro` (or `dmp study ...`) first.", ""]
    lines.extend(["## Verdict", "", verdict(groups, comps, tests, levels) if runs else "No runs, no verdict.", ""])

    section("Main results", main_table(groups, runs, include_seed_numbers),
            "No evaluation results yet (reports/evaluate/details.json and metrics.json are missing).",
            "One row per method and model, on each run's test split: *finetuned* and *zero-shot* (after "
            "pretraining) with the headline scorer named in the Scorer column (ITM re-ranked: ITM re-scores the "
            "ITC top-k; ITC only in the ITC R mean column). Runs differing only in `seed` are one row. The chance "
            "rows are the exact expected recall of a random ranking of the split. "
            + ("Rows marked *reported* are the seed paper's numbers on other data and models "
               "(Flickr30K/COCO, ViT-S or ViT-B towers): context, not a comparison of equals."
               if include_seed_numbers else ""))
    section("Diagnostics", diagnostics_table(groups),
            "No diagnostics: details.json has no `diagnostics` for any run.",
            "Does ITM order what re-ranking orders, and does the fusion use both modalities? ITM AUC top-k: per "
            "query (images and captions), the AUC of the ITM logit over the query's ITC top-k candidates (gold "
            "against the rest), averaged over the queries whose top-k holds both; ITM AUC random: each image "
            "query's gold captions against random captions (does ITM match at all?); both with a bootstrap 95% "
            "interval over queries (0.5 = no signal). Image-use gap: MLM loss with shuffled images minus with "
            "the matching ones (nats), and relative to the matched loss; text-use gap: the same for MIM with "
            "shuffled captions (models with a MIM head; its loss scale depends on the target, so compare the "
            "relative gap). Every variant is measured at the same mask ratios (eval.gap_text_mask_ratio, "
            "eval.gap_image_mask_ratio). 'below floor' flags "
            + ", ".join(f"{DIAGNOSTIC_NAMES[k]} < {v:g}" for k, v in DIAGNOSTIC_FLOORS.items()) + ".")

    lines.extend(["## Statistics", ""])
    units = sorted({c.unit for c in comps if c.unit} | {t.unit for t in tests if t.unit})
    unit_text = (f" Resampling unit here: {'; '.join(units)}." if units else "")
    section("Paired differences", statistics_table(comps),
            "No pair of methods differs in exactly one setting.",
            f"Every pair of methods that differ in exactly one setting: A − B in percentage points on the finetuned "
            f"model's ranks under the scorer named in the table (variants: denoising − MAMO, either − frozen towers; an ablation: changed − base), "
            f"with the paired bootstrap 95% interval over the test split's independent units ({bootstrap_samples} "
            f"resamples with replacement, the same resamples for A and B; RNG seed {BOOTSTRAP_SEED}). The unit "
            f"(column *bootstrap unit*) is the binding group where the split has them (images that are each other's "
            f"distractors are not independent: all images of a drawn group enter together, each with its captions; "
            f"an image outside any group is its own unit), else the image with its captions.{unit_text} This "
            f"interval is the within-test-set uncertainty of one pair of checkpoints: seed 0 of each method (else "
            f"its lowest seed). Per-seed Δ: mean ± std of the R mean differences of the seeds both methods ran; "
            f"across-seed 95% CI: mean ± t(0.975, n−1) · std / √n over those n seeds (paired by seed, "
            f"Student t), "
            f"where both methods ran >= 2 common seeds. The verdict compares recipes only with >= "
            f"{RECIPE_MIN_SEEDS} common seeds, on the across-seed interval.", level="###")
    section("Models against chance", chance_table(tests),
            "No ranks.npz: no model was tested against chance.",
            f"R mean minus the exact chance level, with a 95% bootstrap interval ({bootstrap_samples} resamples of "
            "the unit named in the table; chance enters each resample as the expected hit of a random ranking).",
            level="###")

    figure("Ablations (R@1)", plot_ablations(groups, figures / "ablations.png"),
           "No ablation chart: fewer than two methods have finished runs with metrics.")
    section("Data scaling", scaling_table(groups),
            "No data-scaling table: fewer than two `data.fraction` values have finished runs (run `dmp study scaling`).",
            (scaling_policy(groups) + " Steps and epochs are those each run trained "
             "(reports/pretrain/metrics.json and reports/finetune/metrics.json).")
            if scaling_sets(groups) else "")
    figure("Data scaling (R@1)", plot_scaling(groups, figures / "scaling.png"),
           "No data-scaling plot: fewer than two `data.fraction` values have finished runs.")

    labels = {name: g.label for g in groups for r in g.runs for name in r.names}
    loss_plot = plot_losses(histories or {}, labels, figures / "pretrain_losses.png")
    figure("Pretraining loss terms", loss_plot,
           "No loss curves: no pretraining history was found (reports/pretrain/history.csv or MLflow metric histories).")

    lines.extend(["## Retrieval gallery", ""])
    if gallery is None:
        lines.extend([f"No gallery: {no_gallery}.", ""])
    else:
        gallery_label = labels.get(gallery_run, gallery_run)
        for model in gallery.scores:
            path = plot_gallery(gallery, model, figures / f"gallery_{model}.png", queries=gallery_queries)
            lines.extend([f"### {model} {MODEL_TITLES.get(model, '')}".rstrip(), "",
                          f"![gallery {model}](figures/{path.name})", "",
                          f"Run `{gallery_run}` ({gallery_label}), {SCORER_NAMES['itm']}: {gallery_caption(gallery)}.",
                          ""])

    if runs:
        section("Provenance", provenance_table(groups, baseline), "",
                f"Each run: its names (workspace, HEAD commit, DVC experiments; merged when params and metrics are "
                f"identical), the params that differ from the baseline ({baseline_source}), MLflow run ids, and "
                f"what is missing.")
    md_path = out_dir / "results.md"
    write_text(md_path, "\n".join(lines).rstrip() + "\n")
    return md_path
