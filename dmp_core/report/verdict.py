"""Statistics and the verdict: paired bootstraps of the groups that differ in one setting,
every model against chance, their tables, and the paragraph generated from the numbers."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from dmp_core.report.runs import MODELS, SCORER_NAMES, Group, Run, _ignored, _short, describe_diff
from dmp_core.report.tables import (
    GAP_FLOORS,
    ITM_FLOORS,
    MODEL_NAMES,
    RECALL_KEYS,
    _col,
    _diagnostic_flags,
    _interval,
    _n_seeds,
    _seed_ci_text,
    _signed,
    _split_text,
    bootstrap_unit,
)
from dmp_core.stats import bootstrap_vs_chance, excludes_zero, paired_bootstrap, seed_interval

BOOTSTRAP_SEED = 0  # the same resamples every time the report is built
RECIPE_MIN_SEEDS = 3  # seeds (run by both methods) before the verdict speaks of recipes


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
            head = run.headline
            reranked, itc = run.recall("finetune", "r_mean"), run.recall("finetune", "r_mean", "itc")
            if head != "itc" and reranked is not None and itc is not None and reranked < itc:
                sentences.append(f"Re-ranking ranks below its own retriever for {run.name} ({group.label}): finetuned "
                                 f"R mean {reranked:.1f} {SCORER_NAMES.get(head, head)} vs {itc:.1f} ITC-only "
                                 "(a defect of the re-ranker, not a result).")
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
