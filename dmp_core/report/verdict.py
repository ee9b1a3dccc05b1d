"""Statistics and the verdict: paired bootstraps of the groups that differ in one setting,
every model against chance, their tables, the claims table at the top of the report (the
paired per-seed differences with their t intervals) and the comparisons in words."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from dmp_core.report.runs import (
    MODELS,
    SCALING_AXES,
    SCORER_NAMES,
    Group,
    Missing,
    Run,
    _fmt_value,
    _ignored,
    _short,
    describe_diff,
)
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


def comparisons_text(comps: Sequence[Comparison]) -> str:
    """The variant comparisons in words (:func:`_variant_sentence`): which interval a claim rests on."""
    variant = [_variant_sentence(c) for c in comps if c.setting == "objective.variant"]
    return " ".join(variant) or "No denoising − MAMO interval: no two runs differ only in objective.variant."


# ------------------------------------------------------------------ claims: the verdict table
def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


@dataclass
class Claim:
    """A − B of one model's R mean over the seeds both groups ran, paired by seed."""

    seeds: list
    diffs: list[float]
    ci: Optional[dict[str, float]]  # stats.seed_interval of diffs (>= 2 seeds)
    better: Optional[str]  # the better side when claimable (>= RECIPE_MIN_SEEDS seeds, ci excludes 0)

    @property
    def word(self) -> str:
        return f"{self.better} better" if self.better else "no claim"

    @property
    def cell(self) -> str:
        """``+1.2 [−0.3, +2.7]`` (the mean and its 95% t interval), ``+1.2 (1 seed)`` or ``–``."""
        if self.ci is not None:
            return f"{_signed(self.ci['diff'])} [{_signed(self.ci['lo'])}, {_signed(self.ci['hi'])}]"
        return f"{_signed(self.diffs[0])} (1 seed)" if self.diffs else "–"


def paired_claim(a: Group, b: Group, model: str, scorer: Optional[str] = None,
                 names: tuple[str, str] = ("A", "B")) -> Claim:
    """A − B of ``model``'s R mean (``scorer``; default: each run's headline) over the seeds both
    ran. The better side (``names``) is claimed only with >= RECIPE_MIN_SEEDS seeds and a 95%
    t interval of the mean difference (stats.seed_interval) that excludes 0."""
    value_a = {r.seed: r.recall(model, "r_mean", scorer) for r in a.runs}
    value_b = {r.seed: r.recall(model, "r_mean", scorer) for r in b.runs}
    seeds = sorted((s for s in value_a if value_a[s] is not None and value_b.get(s) is not None), key=_seed_key)
    diffs = [value_a[s] - value_b[s] for s in seeds]
    ci = seed_interval(diffs) if len(diffs) >= 2 else None
    better = None
    if ci is not None and ci["n"] >= RECIPE_MIN_SEEDS and excludes_zero(ci):
        better = names[0] if ci["diff"] > 0 else names[1]
    return Claim(seeds, diffs, ci, better)


def side_names(comp: Comparison) -> tuple[str, str]:
    """How a claim names the two sides: ``denoising`` / ``MAMO`` for the variant, else the
    changed setting's values (``vicreg=false`` / ``vicreg=recipe``)."""
    if comp.setting == "objective.variant":
        return VARIANT_NAMES.get(str(comp.a.variant), str(comp.a.variant)), \
            VARIANT_NAMES.get(str(comp.b.variant), str(comp.b.variant))
    key = comp.setting
    return f"{_short(key)}={_fmt_value(key, comp.a.params.get(key))}", \
        f"{_short(key)}={_fmt_value(key, comp.b.params.get(key))}"


def point_name(group: Group, axes: Sequence[str] = ()) -> str:
    """``denoising at pretraining fraction 0.5``; settings other than the variant and the
    scaling axes in brackets (``MAMO (vicreg=false)``)."""
    name = VARIANT_NAMES.get(str(group.variant), str(group.variant))
    rest = describe_diff(group.diff, skip=("objective.variant", *SCALING_AXES))
    where = ", ".join(f"{SCALING_AXES[axis]} {group.axis(axis):g}" for axis in axes)
    return name + (f" ({rest})" if rest else "") + (f" at {where}" if where else "")


def short_of_seeds(groups: Sequence[Group], axes: Sequence[str] = (), missing: Sequence[Missing] = ()) -> list[str]:
    """The points of a study that cannot carry a claim: groups with fewer than RECIPE_MIN_SEEDS
    seeds, or without a seed that another of ``groups`` ran or that the study's plan has
    (``missing``: :func:`~dmp_core.report.runs.missing_points`) (``denoising at pretraining
    fraction 0.5: 2 seeds (0, 1; missing 2)``), and the planned points that have no run at all
    (``MAMO at pretraining fraction 0.25: seeds 0, 1, 2 not run``)."""
    expected = sorted({s for g in groups for s in g.seeds}, key=_seed_key)
    planned = {id(m.group): m.seeds for m in missing}
    points = list(groups) + [m.group for m in missing if not any(m.group is g for g in groups)]
    out = []
    for group in sorted(points, key=lambda g: (_variant_rank(g), str(g.variant), *(g.axis(a) for a in axes), g.label)):
        have = sorted(set(group.seeds), key=_seed_key)
        if not have:
            seeds = sorted(set(planned.get(id(group), [])), key=_seed_key)
            out.append(f"{point_name(group, axes)}: seed{'s' if len(seeds) != 1 else ''} "
                       f"{', '.join(map(str, seeds))} not run")
            continue
        missed = sorted({s for s in [*expected, *planned.get(id(group), [])] if s not in have}, key=_seed_key)
        if missed or len(have) < RECIPE_MIN_SEEDS:
            listed = ", ".join(map(str, have)) + (f"; missing {', '.join(map(str, missed))}" if missed else "")
            out.append(f"{point_name(group, axes)}: {_n_seeds(len(have))} ({listed})")
    return out


def plan_axes(groups: Sequence[Group], missing: Sequence[Missing] = ()) -> list[str]:
    """The scaling axes on which ``groups`` and the planned points not run take more than one value."""
    return varying_axes([*groups, *(m.group for m in missing)])


def _claimed(comps: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons the verdict table shows (not those along a scaling axis), in order:
    denoising − MAMO, denoising − frozen, MAMO − frozen, then other settings by name."""
    def rank(comp: Comparison) -> tuple:
        if comp.setting == "objective.variant":
            return 0, _variant_rank(comp.a), _variant_rank(comp.b), claim_title(comp)
        return 1, 0, 0, claim_title(comp)
    chosen = [c for c in comps if c.setting not in SCALING_AXES]
    return sorted(chosen, key=lambda c: (rank(c), *(c.a.axis(axis) for axis in SCALING_AXES)))


def varying_axes(groups: Sequence[Group]) -> list[str]:
    """The scaling axes (SCALING_AXES keys) on which ``groups`` take more than one value."""
    return [axis for axis in SCALING_AXES if len({g.axis(axis) for g in groups}) > 1]


def _varying_axes(comps: Sequence[Comparison]) -> list[str]:
    return [axis for axis in SCALING_AXES if len({g.axis(axis) for c in comps for g in (c.a, c.b)}) > 1]


def claim_title(comp: Comparison) -> str:
    """``denoising − MAMO``; shared settings other than the scaling axes after ``at``."""
    name_a, name_b = side_names(comp)
    rest = describe_diff(comp.a.diff, skip=(comp.setting, *SCALING_AXES))
    return f"{name_a} − {name_b}" + (f" at {rest}" if rest else "")


def claims_table(comps: Sequence[Comparison]) -> pd.DataFrame:
    """The verdict: one row per comparison (two groups that differ in one setting other than a
    scaling axis), value of each scaling axis that varies, and model: the mean per-seed
    difference of R mean (headline scorer) with its 95% t interval, the seeds, the claim."""
    chosen = _claimed(comps)
    axes = _varying_axes(chosen)
    rows = []
    for comp in chosen:
        for model in MODELS:
            claim = paired_claim(comp.a, comp.b, model, names=side_names(comp))
            rows.append({"Comparison (A − B)": claim_title(comp),
                         **{SCALING_AXES[axis]: f"{comp.a.axis(axis):g}" for axis in axes},
                         "Model": MODEL_NAMES[model], "Δ R mean [95% t interval]": claim.cell,
                         "Seeds": str(len(claim.seeds)), "Claim": claim.word})
    return pd.DataFrame(rows)


def rerank_gain_table(groups: Sequence[Group], axes: Sequence[str] = ()) -> pd.DataFrame:
    """Does the second stage pay? Per method (and point of a scaling axis) and model: the headline
    re-ranked R mean minus the same model's ITC-only R mean, per seed and as the mean with its 95%
    t interval over seeds, and whether re-ranking was >= ITC on every seed (a re-ranker below its
    own retriever is a defect). Groups whose headline is ITC itself have no row."""
    rows = []
    ordered = sorted(groups, key=lambda g: (_variant_rank(g), str(g.variant), *(g.axis(a) for a in axes), g.label))
    for group in ordered:
        for model in MODELS:
            pairs = sorted(((r.seed, r.recall(model, "r_mean"), r.recall(model, "r_mean", "itc")) for r in group.runs
                            if r.headline != "itc"), key=lambda p: _seed_key(p[0]))
            gains = [head - itc for _, head, itc in pairs if head is not None and itc is not None]
            if not gains:
                continue
            ci = seed_interval(gains) if len(gains) >= 2 else None
            cell = (f"{_signed(ci['diff'])} [{_signed(ci['lo'])}, {_signed(ci['hi'])}]" if ci is not None
                    else f"{_signed(gains[0])} (1 seed)")
            rows.append({"Method": point_name(group, axes), "Model": MODEL_NAMES[model],
                         "re-ranked − ITC only [95% t interval]": cell,
                         "per seed": ", ".join(_signed(g) for g in gains), "Seeds": str(len(gains)),
                         ">= ITC on every seed": "yes" if min(gains) >= 0 else f"no ({sum(g < 0 for g in gains)} below)"})
    return pd.DataFrame(rows)


def _flag_summary(groups: Sequence[Group]) -> str:
    """How many models the diagnostics flag (the flags table of the Diagnostics section)."""
    models = itm = gap = below_itc = 0
    for group in groups:
        for run in group.runs:
            for model in MODELS:
                diag = run.diagnostics(model)
                models += bool(diag)
                itm += bool(_diagnostic_flags(diag, ITM_FLOORS))
                gap += bool(_diagnostic_flags(diag, GAP_FLOORS))
                head, itc = run.recall(model, "r_mean"), run.recall(model, "r_mean", "itc")
                below_itc += run.headline != "itc" and head is not None and itc is not None and head < itc
    if not (itm or gap or below_itc):
        return (f"The diagnostics flag none of the {models} models (ITM floors, modality use, re-ranking against "
                "ITC)." if models else "No diagnostics.")
    return (f"Diagnostic flags (Diagnostics, first table): ITM below its floor in {itm} of {models} models, a "
            f"modality unused in {gap}, the re-ranking below its own ITC in {below_itc}.")


def verdict(groups: Sequence[Group], comps: Sequence[Comparison], tests: Sequence[ChanceTest],
            levels: Sequence[Mapping[str, Any]], missing: Optional[Sequence[Missing]] = None) -> str:
    """The lines under the claims table: what a claim needs, the points short of seeds and those
    the study's plan has not run (``missing``: None without a plan), or that the planned study is
    complete, how many models the diagnostics flag, and chance."""
    chosen = _claimed(comps)
    sentences = []
    if chosen:
        head = chosen[0].a.runs[0].headline
        sentences.append(f"Δ: A − B of the R mean ({SCORER_NAMES.get(head, head)}, test split), the mean over the "
                         f"seeds both ran of the per-seed differences (paired by seed) with its 95% Student t "
                         f"interval; a claim needs >= {RECIPE_MIN_SEEDS} seeds and an interval that excludes 0. "
                         f"Bootstrap intervals of one checkpoint pair and the comparisons in words: Statistics.")
    involved = [g for g in groups if any(g is c.a or g is c.b for c in chosen)]
    pending = list(missing or ())
    short = short_of_seeds(involved, plan_axes(involved, pending), pending)
    if short:
        why = ", and the study's plan has runs not run yet" if pending else ""
        sentences.append(f"Partial (a claim needs >= {RECIPE_MIN_SEEDS} seeds of each point{why}): "
                         + "; ".join(short) + ".")
    elif missing is not None and chosen:
        sentences.append(f"Complete: every run the study planned has finished and every point has >= "
                         f"{RECIPE_MIN_SEEDS} seeds.")
    sentences.append(_flag_summary(groups))
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
