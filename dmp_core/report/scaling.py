"""Data scaling, per axis of :data:`~dmp_core.report.runs.SCALING_AXES` with >= 2 values
(``pretrain.data_fraction``: pretraining sees a nested share of the training images;
``data.fraction``: the whole pipeline does): the R mean of every method at every value,
the paired per-seed differences between the methods with their t intervals and claims
(:func:`~dmp_core.report.verdict.paired_claim`), the points short of seeds or planned and not
run yet, and which images each stage saw."""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import pandas as pd

from dmp_core.config import nested_count
from dmp_core.report.runs import MODELS, SCALING_AXES, SCORER_NAMES, Group, Missing, Run, method_params
from dmp_core.report.tables import MODEL_NAMES, _mean_std, _split_text, scaling_sets
from dmp_core.report.verdict import RECIPE_MIN_SEEDS, VARIANT_NAMES, VARIANT_ORDER, paired_claim, short_of_seeds

ITC = "itc"


def axis_sets(groups: Sequence[Group]) -> list[tuple[str, list[tuple[str, list[Group]]]]]:
    """(axis, its scaling sets) for every axis with >= 2 values among otherwise equal groups."""
    return [(axis, sets) for axis in SCALING_AXES if (sets := scaling_sets(groups, axis))]


def scorers(groups: Sequence[Group]) -> list[str]:
    """The headline scorer of the groups' first run, then ITC only (once, if that is the headline)."""
    head = groups[0].runs[0].headline
    return [head] if head == ITC else [head, ITC]


def _variant_key(variant: str) -> tuple:
    """denoising, MAMO, frozen towers (the order of their differences), then any other by name."""
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def _variants(members: Sequence[Group]) -> list[str]:
    return sorted({str(g.variant) for g in members}, key=_variant_key)


def _name(variant: str) -> str:
    return VARIANT_NAMES.get(variant, variant)


def fraction_table(sets: Sequence[tuple[str, list[Group]]], axis: str) -> pd.DataFrame:
    """One row per model, scorer and value of ``axis``: each method's R mean (mean ± std over
    its seeds, and their number), then each pair of methods' per-seed difference (paired by
    seed) with its 95% t interval, the seeds and the claim."""
    rows = []
    for name, members in sets:
        variants = _variants(members)
        at = {(str(g.variant), g.axis(axis)): g for g in members}
        for model in MODELS:
            for scorer in scorers(members):
                for value in sorted({g.axis(axis) for g in members}):
                    row = {"Settings": name} if len(sets) > 1 else {}
                    row.update({"Model": MODEL_NAMES[model], "Scorer": SCORER_NAMES.get(scorer, scorer),
                                SCALING_AXES[axis]: f"{value:g}"})
                    for variant in variants:
                        group = at.get((variant, value))
                        values = group.values(model, "r_mean", scorer) if group else []
                        row[_name(variant)] = f"{_mean_std(values)} ({len(values)})" if values else "–"
                    for va, vb in combinations(variants, 2):
                        a, b = at.get((va, value)), at.get((vb, value))
                        cell = "–"
                        if a and b:
                            claim = paired_claim(a, b, model, scorer, names=(_name(va), _name(vb)))
                            cell = f"{claim.cell} ({len(claim.seeds)}): {claim.word}" if claim.seeds else "–"
                        row[f"{_name(va)} − {_name(vb)}"] = cell
                    rows.append(row)
    return pd.DataFrame(rows)


def partial_text(sets: Sequence[tuple[str, list[Group]]], axis: str,
                 missing: Optional[Sequence[Missing]] = None) -> str:
    """``Partial: ...`` naming every point (method x value) short of seeds and every point of the
    study's plan not run yet (``missing``: None without a plan), or ``Complete: ...``."""
    pending = [(members, in_set(members, axis, missing or ())) for _, members in sets]
    short = [item for members, planned in pending for item in short_of_seeds(_in_order(members, axis), [axis], planned)]
    if short:
        planned = ", or runs the study planned that have not run yet" if any(p for _, p in pending) else ""
        return (f"Partial study: these points have fewer seeds than a claim needs (>= {RECIPE_MIN_SEEDS}) or than "
                f"the other points{planned}: " + "; ".join(short) + ".")
    seeds = sorted({s for _, members in sets for g in members for s in g.seeds})
    planned = " every run the study planned at these settings has finished and" if missing is not None else ""
    return f"Complete:{planned} every point has the seeds {', '.join(map(str, seeds))}."


def in_set(members: Sequence[Group], axis: str, missing: Sequence[Missing]) -> list[Missing]:
    """The planned points not run that belong to a scaling set (``members``): one of its groups,
    or a method that differs from them only in the variant and ``axis``."""
    def key(group: Group) -> tuple:
        return tuple(item for item in method_params(group.params) if item[0] not in ("objective.variant", axis))

    keys = {key(g) for g in members}
    return [m for m in missing if any(m.group is g for g in members) or (not m.group.runs and key(m.group) in keys)]


def _in_order(members: Sequence[Group], axis: str) -> list[Group]:
    return sorted(members, key=lambda g: (_variant_key(str(g.variant)), g.axis(axis)))


# ------------------------------------------------------------------ which images each stage saw
def training_images(run: Run, stage: str) -> Optional[int]:
    """The training images ``stage`` saw: the training split's size that preprocessing recorded
    (reports/preprocess/summary.json, after data.fraction) or, on synthetic data without it, the
    nested share data.fraction of data.synthetic.n_train; times pretrain.data_fraction for
    pretraining (dmp_core.training.loop: the same ceil). None where neither is there."""
    images: Optional[int] = run.split_images.get("train")
    if images is None:
        if run.params.get("data.name") != "synthetic" or not isinstance(run.params.get("data.synthetic.n_train"), int):
            return None
        images = nested_count(run.params["data.synthetic.n_train"], float(run.params.get("data.fraction") or 1.0))
    return nested_count(images, float(run.params.get("pretrain.data_fraction") or 1.0)) if stage == "pretrain" else images


def _images_cell(runs: Sequence[Run], stage: str) -> str:
    counts = sorted({n for r in runs if (n := training_images(r, stage)) is not None})
    return " / ".join(f"{n:,}" for n in counts) + " images" if counts else "size not recorded"


def splits_text(sets: Sequence[tuple[str, list[Group]]], axis: str) -> str:
    """Which images each stage saw: per value of ``axis``, the training images of pretraining
    (and finetuning, on the whole-pipeline axis); the full training split for finetuning on the
    pretraining axis; the test split(s) of the evaluation."""
    runs = [r for _, members in sets for g in members for r in g.runs]
    by_value: dict[float, list[Run]] = {}
    for _, members in sets:
        for group in members:
            by_value.setdefault(group.axis(axis), []).extend(group.runs)
    values = sorted(by_value)
    pretrain = ", ".join(f"{v:g}: {_images_cell(by_value[v], 'pretrain')}" for v in values)
    tests = sorted({_split_text(r.split) for r in runs})
    if axis == "pretrain.data_fraction":
        stages = (f"pretraining saw the nested fraction f of the training split (f = {pretrain}); finetuning and "
                  f"the re-ranker's refit saw the full training split ({_images_cell(runs, 'finetune')})")
    else:
        stages = (f"the whole pipeline saw the nested fraction f of the training split: pretraining "
                  f"(f = {pretrain}), finetuning (f = "
                  + ", ".join(f"{v:g}: {_images_cell(by_value[v], 'finetune')}" for v in values) + ")")
    return (f"Splits: {stages}; evaluation: {'; '.join(tests)} at every f (details.json). "
            "Image counts: the training split of reports/preprocess/summary.json, else computed from the "
            "params (synthetic data).")
