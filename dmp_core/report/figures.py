"""The report's plots (matplotlib, Agg): pretraining loss terms, data scaling (R mean against a
fraction, with across-seed t bands), ablations."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from dmp_core.io import atomic_path
from dmp_core.report.runs import SCALING_AXES, SCORER_NAMES, Group
from dmp_core.report.scaling import _variants, scorers
from dmp_core.report.tables import MODEL_NAMES, _at_base_fraction
from dmp_core.report.verdict import VARIANT_NAMES
from dmp_core.stats import seed_interval

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


def _band(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its across-seed 95% t interval (stats.seed_interval: mean -/+ t · std / sqrt(n));
    a single seed has no band."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    ci = seed_interval(values)  # the t interval of a mean: here of R mean values, not differences
    return ci["diff"], ci["lo"], ci["hi"]


def plot_scaling(sets: Sequence[tuple[str, list[Group]]], axis: str, path: Path) -> Path | None:
    """R mean against the value of ``axis`` (log x), one line per method with its across-seed
    95% t band: one panel per model (zero-shot, finetuned) and scorer (headline, ITC only)."""
    if not sets:
        return None
    plt = _figure()
    panel_scorers = scorers([g for _, members in sets for g in members])
    models = ("pretrain", "finetune")
    fig, axes = plt.subplots(len(panel_scorers), len(models), figsize=(4.6 * len(models), 3.3 * len(panel_scorers)),
                             squeeze=False, sharex=True)
    values = sorted({g.axis(axis) for _, members in sets for g in members})
    for row, scorer in enumerate(panel_scorers):
        for col, model in enumerate(models):
            ax = axes[row][col]
            for name, members in sets:
                for variant in _variants(members):
                    points = [(g.axis(axis), g.values(model, "r_mean", scorer))
                              for g in members if str(g.variant) == variant]
                    points = sorted((x, _band(v)) for x, v in points if v)
                    if not points:
                        continue
                    label = VARIANT_NAMES.get(variant, variant) + (f" ({name})" if len(sets) > 1 else "")
                    xs = [x for x, _ in points]
                    (line,) = ax.plot(xs, [b[0] for _, b in points], marker="o", label=label)
                    ax.fill_between(xs, [b[1] for _, b in points], [b[2] for _, b in points],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xscale("log")
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
            ax.set_title(f"{MODEL_NAMES[model]}, {SCORER_NAMES.get(scorer, scorer)}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(panel_scorers) - 1:
                ax.set_xlabel(f"{SCALING_AXES[axis]} ({axis}, log scale)")
            if col == 0:
                ax.set_ylabel("R mean (%), test split")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("R mean, mean over seeds with the across-seed 95% t interval (band)", fontsize=10)
    fig.tight_layout()
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
