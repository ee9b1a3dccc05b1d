"""The report's tables (main results with the chance rows, diagnostics, data scaling,
provenance) and the number and markdown formatting they share with the verdict."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from dmp_core.report.runs import (
    MODELS,
    SCALING_AXES,
    SCORER_NAMES,
    SEED_SCORER,
    Group,
    Run,
    describe_diff,
    method_params,
    param_diff,
)
from dmp_core.seed_results import SEED_RESULTS
from dmp_core.stats import chance_recall

RECALLS = [("tr", 1), ("tr", 5), ("tr", 10), ("ir", 1), ("ir", 5), ("ir", 10)]
RECALL_KEYS = [f"{d}_r{k}" for d, k in RECALLS]
MODEL_NAMES = {"finetune": "finetuned", "pretrain": "zero-shot"}
# the verdict's floors: ITM that does not order the ITC top-k / does not match at all (per-query
# AUCs), and a fusion that does not use a modality (gaps relative to the matched loss, at the
# common mask ratios eval.gap_*_mask_ratio, so that variants and loss scales compare)
ITM_FLOORS = {"itm_auc": 0.6, "itm_auc_random": 0.6}
GAP_FLOORS = {"image_use_gap_rel": 0.02, "text_use_gap_rel": 0.02}
DIAGNOSTIC_FLOORS = {**ITM_FLOORS, **GAP_FLOORS}
DIAGNOSTIC_NAMES = {"itm_auc": "ITM AUC on the ITC top-k", "itm_auc_random": "ITM AUC vs random negatives",
                    "image_use_gap_rel": "relative image-use gap", "text_use_gap_rel": "relative text-use gap"}


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
    """The groups at the baseline's value of every scaling axis (the main table's rows)."""
    return [g for g in groups if not set(SCALING_AXES) & set(g.diff)]


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
            row["R mean, seed's scorer"] = _mean_std(group.values(model, "r_mean", SEED_SCORER))
            row["ITC R mean"] = _mean_std(group.values(model, "r_mean", "itc"))
            row["Runs"] = group.run_names
            rows.append(row)
    for level in chance_levels(runs):
        split, chance = level["split"], level["chance"]
        row = {"Method": "chance (random ranking, exact)", "Model": "–", "Dataset": split.get("dataset"),
               "Image size": "–", "Scorer": "any", "Seeds": "–"}
        for key in RECALL_KEYS:
            row[_col(key)] = f"{chance[key]:.2f}"
        row["R mean"] = row["R mean, seed's scorer"] = row["ITC R mean"] = f"{chance['r_mean']:.2f}"
        row["Runs"] = f"{_split_text(split)} (from {level['source']})"
        rows.append(row)
    if include_seed_numbers:
        for res in SEED_RESULTS:
            row = {"Method": res["method"], "Model": "finetuned", "Dataset": res["dataset"], "Image size": "–",
                   "Scorer": res["protocol"], "Seeds": "–"}
            for key in RECALL_KEYS:
                row[_col(key)] = f"{res[key]:g}"
            row["R mean"] = f"{np.mean([res[k] for k in RECALL_KEYS]):.1f}"
            row["R mean, seed's scorer"] = row["R mean"]
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
                    "re-ranked gold: up / down / same (net)": _moves(diag, "rerank"),
                    "seed's scorer: up / down / same (net)": _moves(diag, SEED_SCORER),
                    "k, ITC weight, fit step (val)": _knobs(diag),
                    "image-use gap, nats (rel.)": _with_rel(diag, "image_use_gap"),
                    "text-use gap (rel.)": _with_rel(diag, "text_use_gap"),
                    "MLM loss matched / shuffled": _pair(diag.get("mlm_loss_matched"), diag.get("mlm_loss_shuffled")),
                    "below floor": "; ".join(flags) or "–",
                })
    return pd.DataFrame(rows)


def _moves(diag: Mapping[str, Any], prefix: str) -> str:
    """``41 / 12 / 180 (+29)``: queries whose gold (inside the ITC top-k) re-ranking moved up,
    down or left in place, and the net promotions."""
    up, down, same = (diag.get(f"{prefix}_{k}") for k in ("up", "down", "same"))
    if not all(isinstance(v, (int, float)) for v in (up, down, same)):
        return "–"
    return f"{up:.0f} / {down:.0f} / {same:.0f} ({up - down:+.0f})".replace("-", "−")


def uses_rerank_gate(groups: Sequence[Group]) -> bool:
    """Whether any model of ``groups`` was evaluated with the re-ranker's val gate (``eval.rerank_gate``)."""
    return any("rerank_kept" in run.diagnostics(model) for group in groups for run in group.runs for model in MODELS)


def _knobs(diag: Mapping[str, Any]) -> str:
    """``16, 2, 150``: the re-ranker's k, ITC weight and refit step chosen on val (the step
    is absent from runs evaluated before the refit existed); with the val gate (``eval.rerank_gate``)
    also its val gain over ITC with the bootstrap interval and the decision:
    ``16, 2, 150; val +1.08 [+0.09, +2.13]: kept`` or ``16, 0.5, 0; val +0.81 [−0.21, +1.83]: ITC's order``."""
    k, w, step = diag.get("rerank_k"), diag.get("rerank_itc_weight"), diag.get("rerank_fit_step")
    if not (isinstance(k, (int, float)) and isinstance(w, (int, float))):
        return "–"
    out = f"{k:.0f}, {w:g}" + (f", {step:.0f}" if isinstance(step, (int, float)) else "")
    gain, lo, hi, kept = (diag.get(f"rerank_{key}") for key in ("val_gain", "val_gain_lo", "val_gain_hi", "kept"))
    if all(isinstance(v, (int, float)) for v in (gain, lo, hi, kept)):
        verdict = "kept" if kept else "ITC's order"
        out += f"; val {gain:+.2f} [{lo:+.2f}, {hi:+.2f}]: {verdict}".replace("-", "−")
    return out


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


RERANK_FLAG = "re-ranked R mean < ITC R mean"


def flags_table(groups: Sequence[Group]) -> pd.DataFrame:
    """One row per method and model, one column per flag: in how many of its runs a diagnostic
    lies below its floor (:data:`DIAGNOSTIC_FLOORS`) or the headline re-ranking ranks below
    its own ITC, with the flagged values; ``no (0 of n)`` when none, ``–`` when not measured."""
    rows = []
    for group in groups:
        for model in MODELS:
            runs = [r for r in group.runs if r.models.get(model)]
            if not runs:
                continue
            row = {"Method": group.label, "Model": MODEL_NAMES[model], "Seeds": _seeds_cell(group)}
            for key, floor in DIAGNOSTIC_FLOORS.items():
                values = [v for r in runs if _is_number(v := r.diagnostics(model).get(key))]
                row[f"{DIAGNOSTIC_NAMES[key]} < {floor:g}"] = _flag_cell(
                    [f"{v:.3f}" for v in values if v < floor], len(values))
            pairs = [(r.recall(model, "r_mean"), r.recall(model, "r_mean", "itc")) for r in runs if r.headline != "itc"]
            pairs = [(head, itc) for head, itc in pairs if head is not None and itc is not None]
            row[RERANK_FLAG] = _flag_cell([f"{head:.1f} < {itc:.1f}" for head, itc in pairs if head < itc], len(pairs))
            rows.append(row)
    return pd.DataFrame(rows)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag_cell(flagged: Sequence[str], measured: int) -> str:
    """``2 of 3: 0.552, 0.561`` (the flagged runs' values), ``no (0 of 3)``, or ``–`` (not measured)."""
    if not measured:
        return "–"
    return f"{len(flagged)} of {measured}: {', '.join(flagged)}" if flagged else f"no (0 of {measured})"


# ------------------------------------------------------------------ data scaling
def scaling_sets(groups: Sequence[Group], axis: str = "data.fraction") -> list[tuple[str, list[Group]]]:
    """Sets of groups that differ from each other only in variant and the scaling ``axis``
    (a key of :data:`SCALING_AXES`), with >= 2 values of it.

    Each set is named by its other settings' difference from the baseline (a scaling
    study run with ``-S pretrain.epochs=1 -S pretrain.steps=null`` is its own set).
    """
    varying = ("objective.variant", axis)
    sets: dict[tuple, list[Group]] = {}
    for group in groups:
        key = tuple(item for item in method_params(group.params) if item[0] not in varying)
        sets.setdefault(key, []).append(group)
    out = []
    for members in sets.values():
        if len({g.axis(axis) for g in members}) >= 2:
            name = describe_diff(members[0].diff, skip=varying) or "baseline settings"
            out.append((name, sorted(members, key=lambda g: (str(g.variant), g.axis(axis)))))
    return sorted(out, key=lambda item: (item[0] != "baseline settings", item[0]))


def _values_cell(values: Sequence[Any]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    unique = sorted(set(values))
    return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in unique)


def scaling_table(groups: Sequence[Group], axis: str = "data.fraction") -> pd.DataFrame:
    """Rows by variant x value of ``axis``, with the steps and epochs each run actually trained."""
    rows = []
    for name, members in scaling_sets(groups, axis):
        for group in members:
            first = group.runs[0]
            row = {"Settings": name, "Variant": group.variant, axis: f"{group.axis(axis):g}",
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


def _policy(runs: Sequence[Run], axis: str) -> str:
    """Each stage's training length across the runs of one scaling set (finetuning on the
    pretraining axis sees the full split at every fraction, so its length is not a policy)."""
    parts = []
    for stage in ("pretrain", "finetune"):
        steps = {r.params.get(f"{stage}.steps") for r in runs}
        epochs = {r.params.get(f"{stage}.epochs") for r in runs}
        if stage == "finetune" and axis == "pretrain.data_fraction":
            length = (f"finetune.steps={steps.pop()}" if None not in steps and len(steps) == 1 else
                      f"finetune.epochs={epochs.pop()}" if None not in epochs and len(epochs) == 1 else "mixed lengths")
            parts.append(f"finetune: the full training split at every fraction ({length})")
        elif None not in steps and len(steps) == 1:
            parts.append(f"{stage}: equal optimiser steps ({stage}.steps={steps.pop()} at every fraction, so smaller "
                         "fractions repeat their data for more epochs)")
        elif None not in epochs and len(epochs) == 1:
            parts.append(f"{stage}: equal epochs ({stage}.epochs={epochs.pop()} at every fraction, so smaller "
                         "fractions train fewer steps: data and compute are confounded)")
        else:
            parts.append(f"{stage}: mixed training lengths across runs (see the steps and epochs columns)")
    return "; ".join(parts)


def scaling_policy(groups: Sequence[Group], axis: str = "data.fraction") -> str:
    """Which training length each scaling set shares: equal optimiser steps, equal epochs, or neither."""
    sets = scaling_sets(groups, axis)
    if len(sets) == 1:
        return f"Training-length policy: {_policy([r for g in sets[0][1] for r in g.runs], axis)}."
    return "Training-length policy: " + " | ".join(
        f"{name}: {_policy([r for g in members for r in g.runs], axis)}" for name, members in sets) + "."


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
