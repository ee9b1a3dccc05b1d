"""The research report: ``reports/results.md`` and ``reports/figures/*.png``.

Everything arrives as plain data, so this module knows nothing about DVC or MLflow:

- *records*: one dict per finished run of the pipeline (the workspace and every DVC
  experiment) with ``name``, ``params`` (dotted keys), ``metrics`` (dotted keys such
  as ``finetune.itm_ir_r1`` from reports/evaluate/metrics.json), ``run_ids``
  (stage -> MLflow run id) and ``workspace`` (bool). :func:`records_from_exp_rows`
  turns the rows of ``dvc.api.exp_show()`` into records.
- *histories*: record name -> DataFrame of pretraining loss terms per step.
- *gallery*: the score matrices of reports/evaluate/scores.npz with the test images
  and captions (:func:`load_gallery`).

Runs that differ only in ``seed`` form one group; tables show mean ± std over seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from dmp_core.config import Config, flatten
from dmp_core.errors import DataError
from dmp_core.io import atomic_path, write_text
from dmp_core.seed_results import SEED_RESULTS

RECALLS = [("tr", 1), ("tr", 5), ("tr", 10), ("ir", 1), ("ir", 5), ("ir", 10)]
# params that never make two runs "different methods"
IGNORED_PARAMS = ("seed", "tracking.", "report.", "eval.batch_size", "eval.itm_batch_size", "eval.chunk_size",
                  "pretrain.num_workers", "finetune.num_workers", "pretrain.log_every", "finetune.log_every",
                  "pretrain.checkpoint_every", "finetune.checkpoint_every", "targets.batch_size")
PARAM_KEYS = frozenset(flatten(Config()))
METRIC_STAGES = ("pretrain", "finetune")


# ------------------------------------------------------------------ records
def normalise_value(value: Any) -> Any:
    """exp_show gives floats or strings; make equal params compare equal."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        lowered = text.lower()
        if lowered in ("none", "null", "", "-"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        try:
            value = float(text)
        except ValueError:
            return text
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        return int(value) if value.is_integer() else value
    if isinstance(value, (list, tuple)):
        return str(list(value))
    return value


def records_from_exp_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Turn ``dvc.api.exp_show()`` rows into report records.

    Keeps the workspace row and every experiment that has evaluation metrics; other
    baseline commits, queued, running and failed experiments are dropped. Column
    names may carry a ``file:`` prefix (DVC adds it when a name is ambiguous); a
    column is a param if its dotted name is a key of params.yaml, a metric if it is
    ``<pretrain|finetune>.<metric>`` from reports/evaluate/metrics.json, and a run id
    if it ends in ``run_id``.
    """
    records = []
    for row in rows:
        typ = row.get("typ")
        is_workspace = row.get("rev") == "workspace"
        if typ == "baseline" and not is_workspace:
            continue
        if str(row.get("State") or "").lower() in ("queued", "running", "failed"):
            continue
        params: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        run_ids: dict[str, str] = {}
        for column, value in row.items():
            path, _, key = column.rpartition(":")
            if key in PARAM_KEYS and not path.startswith("reports"):
                params[key] = normalise_value(value)
                continue
            if key.endswith("run_id") and value:
                run_ids[key.split(".")[0] if "." in key else (Path(path).parent.name or key)] = str(value)
                continue
            stage, _, metric = key.partition(".")
            if stage in METRIC_STAGES and metric.startswith(("itm_", "itc_")) and key not in PARAM_KEYS:
                number = normalise_value(value)
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    metrics[key] = float(number)
        if not metrics and not is_workspace:
            continue
        name = "workspace" if is_workspace else str(row.get("Experiment") or row.get("rev"))
        records.append({"name": name, "rev": row.get("rev"), "params": params, "metrics": metrics,
                        "run_ids": run_ids, "workspace": is_workspace})
    return records


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORED_PARAMS)


def param_diff(params: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Params (other than seed and bookkeeping) whose value differs from the baseline's."""
    keys = sorted(set(params) | set(baseline))
    return {k: params.get(k) for k in keys if not _ignored(k) and normalise_value(params.get(k)) != normalise_value(baseline.get(k))}


def _fmt_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _label(params: Mapping[str, Any], diff: Mapping[str, Any]) -> str:
    """Readable group label: the variant, then the other differing params."""
    variant = params.get("objective.variant") or "?"
    rest = [f"{k.removeprefix('objective.')}={_fmt_value(v)}" for k, v in diff.items() if k != "objective.variant"]
    return f"{variant} ({', '.join(rest)})" if rest else str(variant)


def _baseline_params(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    for rec in records:
        if rec.get("workspace"):
            return dict(rec.get("params", {}))
    return dict(records[0].get("params", {})) if records else {}


@dataclass
class Groups:
    """Records annotated with their group label and the params that differ."""

    frame: pd.DataFrame  # one row per record with label, variant, fraction, seed, diff, metrics
    baseline: dict[str, Any] = field(default_factory=dict)


def annotate(records: Sequence[Mapping[str, Any]]) -> Groups:
    baseline = _baseline_params(records)
    rows = []
    for rec in records:
        params = rec.get("params", {})
        diff = param_diff(params, baseline)
        row = {
            "name": rec.get("name"),
            "workspace": bool(rec.get("workspace")),
            "variant": params.get("objective.variant"),
            "dataset": params.get("data.name"),
            "fraction": params.get("data.fraction"),
            "seed": params.get("seed"),
            "diff": diff,
            "label": _label(params, diff),
            "run_ids": dict(rec.get("run_ids", {})),
        }
        row.update(rec.get("metrics", {}))
        rows.append(row)
    columns = ["name", "workspace", "variant", "dataset", "fraction", "seed", "diff", "label", "run_ids"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    return Groups(frame, baseline)


# ------------------------------------------------------------------ tables
def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def _metric_cols(stage: str, scorer: str = "itm") -> list[tuple[str, str]]:
    return [(f"{d.upper()} R@{k}", f"{stage}.{scorer}_{d}_r{k}") for d, k in RECALLS]


def _aggregate(frame: pd.DataFrame, by: list[str], stage: str, scorer: str = "itm", extra: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    rows = []
    for key, group in frame.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["seeds"] = int(group["seed"].nunique(dropna=False))
        row["runs"] = ", ".join(str(n) for n in group["name"])
        for title, col in list(_metric_cols(stage, scorer)) + list(extra):
            row[title] = _mean_std(group[col]) if col in group else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def main_table(groups: Groups, include_seed_numbers: bool = True) -> pd.DataFrame:
    """The seed's layout: TR and IR R@1/5/10 per method and dataset (runs at the baseline data fraction)."""
    frame = groups.frame
    same = frame[frame["diff"].map(lambda d: set(d) <= {"objective.variant"})]
    parts = []
    for stage, what in (("finetune", "finetuned"), ("pretrain", "zero-shot")):
        cols = [c for _, c in _metric_cols(stage) if c in same]
        have = same.dropna(subset=cols, how="all") if cols else same.iloc[0:0]
        if have.empty:
            continue
        table = _aggregate(have, ["variant", "dataset"], stage)
        table.insert(0, "Method", table.pop("variant").map(lambda v: f"{v} (ours, {what})"))
        table.insert(1, "Dataset", table.pop("dataset"))
        parts.append(table)
    if include_seed_numbers:
        seed_rows = []
        for res in SEED_RESULTS:
            row = {"Method": res["method"], "Dataset": res["dataset"], "seeds": "–", "runs": res["source"]}
            for d, k in RECALLS:
                row[f"{d.upper()} R@{k}"] = f"{res[f'{d}_r{k}']:g}"
            seed_rows.append(row)
        parts.append(pd.DataFrame(seed_rows))
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)


def ablation_table(groups: Groups) -> pd.DataFrame:
    """One row per method (runs differing only by seed), at the baseline data fraction."""
    frame = groups.frame
    frame = frame[frame["diff"].map(lambda d: "data.fraction" not in d)]
    if frame.empty:
        return pd.DataFrame()
    extra = [("R mean", "finetune.itm_r_mean"), ("ITC R mean", "finetune.itc_r_mean"), ("zero-shot R mean", "pretrain.itm_r_mean")]
    table = _aggregate(frame, ["label"], "finetune", extra=extra)
    return table.rename(columns={"label": "Method"})


def scaling_table(groups: Groups) -> pd.DataFrame:
    """R@1 against data.fraction per variant (runs differing only by variant, fraction and seed)."""
    frame = groups.frame
    frame = frame[frame["diff"].map(lambda d: set(d) <= {"objective.variant", "data.fraction"})]
    if frame.empty or frame["fraction"].nunique() < 2:
        return pd.DataFrame()
    extra = [("R mean", "finetune.itm_r_mean")]
    table = _aggregate(frame.sort_values(["variant", "fraction"]), ["variant", "fraction"], "finetune", extra=extra)
    keep = ["variant", "fraction", "seeds", "TR R@1", "IR R@1", "R mean", "runs"]
    return table[keep].rename(columns={"variant": "Variant", "fraction": "data.fraction"})


def provenance_table(groups: Groups) -> pd.DataFrame:
    rows = []
    for _, rec in groups.frame.iterrows():
        diff = ", ".join(f"{k}={_fmt_value(v)}" for k, v in rec["diff"].items()) or "(baseline)"
        rows.append({
            "run": rec["name"], "group": rec["label"], "seed": rec["seed"], "differs from baseline": diff,
            "pretrain MLflow run": rec["run_ids"].get("pretrain", "–"),
            "finetune MLflow run": rec["run_ids"].get("finetune", "–"),
        })
    return pd.DataFrame(rows)


def _md(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True)  # keep "25.0", "–" as written


# ------------------------------------------------------------------ plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _figure()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
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
            series = pd.Series(history[col].to_numpy(dtype=float), index=steps.to_numpy()).dropna()
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
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(handles) / 4)))
    fig.suptitle("Pretraining loss terms (mean over seeds; a term is absent where a variant does not use it)", y=1.02)
    fig.tight_layout()
    return _save(fig, path)


def plot_scaling(groups: Groups, path: Path) -> Path | None:
    frame = groups.frame
    frame = frame[frame["diff"].map(lambda d: set(d) <= {"objective.variant", "data.fraction"})]
    cols = ["finetune.itm_ir_r1", "finetune.itm_tr_r1"]
    if frame.empty or frame["fraction"].nunique() < 2 or not set(cols) <= set(frame):
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    for ax, col, title in zip(axes.flat, cols, ("image retrieval R@1", "text retrieval R@1")):
        for variant, group in frame.groupby("variant"):
            stats = group.groupby("fraction")[col].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=str(variant))
        ax.set_xscale("log")
        ax.set_xlabel("data.fraction (training images)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("R@1 (%)")
    axes.flat[0].legend()
    return _save(fig, path)


def plot_ablations(groups: Groups, path: Path) -> Path | None:
    frame = groups.frame
    frame = frame[frame["diff"].map(lambda d: "data.fraction" not in d)]
    cols = {"IR R@1": "finetune.itm_ir_r1", "TR R@1": "finetune.itm_tr_r1"}
    if frame.empty or frame["label"].nunique() < 2 or not set(cols.values()) <= set(frame):
        return None
    stats = frame.groupby("label", sort=False)[list(cols.values())].agg(["mean", "std"])
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(stats)), 3.6))
    x = np.arange(len(stats))
    width = 0.38
    for j, (title, col) in enumerate(cols.items()):
        ax.bar(x + (j - 0.5) * width, stats[(col, "mean")], width, yerr=stats[(col, "std")].fillna(0), capsize=3, label=title)
    ax.set_xticks(x, stats.index, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("R@1 (%), finetuned, ITM re-ranked")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------ gallery
@dataclass
class GalleryData:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # one per caption id
    txt2img: np.ndarray  # [M]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (i2t, t2i)


def load_gallery(scores_npz: str | Path, split_dir: str | Path) -> GalleryData:
    """Scores of every model in reports/evaluate/scores.npz and the split's images/captions."""
    scores_npz, split_dir = Path(scores_npz), Path(split_dir)
    for path in (scores_npz, split_dir / "images.npy", split_dir / "captions.parquet"):
        if not path.is_file():
            raise DataError(f"{path}: missing (run the evaluate stage)")
    with np.load(scores_npz) as npz:
        arrays = {k: npz[k] for k in npz.files}
    models = sorted({k[: -len("_i2t")] for k in arrays if k.endswith("_i2t") and not k.endswith("itc_i2t")},
                    key=lambda m: (METRIC_STAGES.index(m) if m in METRIC_STAGES else len(METRIC_STAGES), m))
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
    )


def _query_ids(n: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(count, n))})


def plot_gallery(data: GalleryData, model: str, path: Path, queries: int = 4, top: int = 5) -> Path:
    """Top-``top`` images for a few captions (gold framed green) and top captions for a few images."""
    import textwrap

    from matplotlib.patches import Rectangle

    plt = _figure()
    i2t, t2i = data.scores[model]
    text_q = _query_ids(t2i.shape[0], queries)
    image_q = _query_ids(i2t.shape[0], queries)
    top = min(top, i2t.shape[0], i2t.shape[1])
    fig = plt.figure(figsize=(2.0 * (top + 2), 2.0 * (len(text_q) + len(image_q)) + 0.6))
    grid = fig.add_gridspec(len(text_q) + len(image_q), top + 2)
    for r, t in enumerate(text_q):
        ax = fig.add_subplot(grid[r, :2])
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(textwrap.wrap(f"“{data.captions[t]}”", 28)), va="center", fontsize=8)
        ranked = np.argsort(-t2i[t], kind="stable")[:top]
        for c, img in enumerate(ranked):
            ax = fig.add_subplot(grid[r, 2 + c])
            ax.imshow(np.asarray(data.images[img]))
            ax.set_xticks([]), ax.set_yticks([])
            gold = img == data.txt2img[t]
            h, w = data.images.shape[1:3]
            if gold:
                ax.add_patch(Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor="limegreen", linewidth=5))
            ax.set_title(f"#{c + 1}" + (" gold" if gold else ""), fontsize=7, color="green" if gold else "black")
    for r, img in enumerate(image_q, start=len(text_q)):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(np.asarray(data.images[img]))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"image {img}", fontsize=7)
        ax = fig.add_subplot(grid[r, 1:])
        ax.axis("off")
        ranked = np.argsort(-i2t[img], kind="stable")[:top]
        for c, t in enumerate(ranked):
            gold = data.txt2img[t] == img
            line = f"{c + 1}. {'✓ ' if gold else ''}{textwrap.shorten(data.captions[t], 90)}"
            ax.text(0.02, 1 - (c + 0.5) / top, line, va="center", fontsize=8,
                    color="green" if gold else "black", weight="bold" if gold else "normal")
    fig.suptitle(f"Retrieval gallery: {model} (ITM re-ranked). Rows 1-{len(text_q)}: caption → images; "
                 f"then image → captions. Gold in green.", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


# ------------------------------------------------------------------ the report
MODEL_TITLES = {"pretrain": "after pretraining (zero-shot)", "finetune": "after finetuning"}


def build_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    histories: Mapping[str, pd.DataFrame] | None = None,
    gallery: GalleryData | None = None,
    gallery_queries: int = 4,
    include_seed_numbers: bool = True,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``<out_dir>/results.md`` and ``<out_dir>/figures/*.png``; return the markdown path.

    ``notes`` are extra lines for the top of the report (e.g. where the data came from).
    Every plot without data is left out, with a sentence saying why.
    """
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    groups = annotate(records)
    lines = ["# Results", "", "Generated by `dmp report` from the DVC experiment table "
             "(workspace + experiments), reports/evaluate/scores.npz and the MLflow runs. "
             "Recall in %, ITM re-ranked (ALBEF protocol) unless marked ITC; mean ± std over seeds.", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")

    def section(title: str, table: pd.DataFrame, empty: str, text: str = "") -> None:
        lines.extend([f"## {title}", ""])
        if text:
            lines.extend([text, ""])
        lines.extend([_md(table) if not table.empty else empty, ""])

    if groups.frame.empty:
        lines += ["No finished runs: run `dvc repro` (or `dmp study ...`) first.", ""]
    section("Main results", main_table(groups, include_seed_numbers),
            "No evaluation metrics yet (reports/evaluate/metrics.json is missing).",
            "Our rows: test split of the configured dataset, runs at the baseline settings. "
            + ("Rows marked *reported* are the seed paper's numbers on other data and models "
               "(Flickr30K/COCO, ViT-S or ViT-B towers): context, not a comparison of equals."
               if include_seed_numbers else ""))
    section("Ablations", ablation_table(groups),
            "No ablation runs yet: run `dmp study ablations`.",
            "Finetuned retrieval per method; each row groups runs that differ only in `seed`.")

    def figure(title: str, path: Path | None, missing: str) -> None:
        lines.extend([f"### {title}", ""])
        lines.extend([f"![{title}](figures/{path.name})" if path else missing, ""])

    figure("Ablations (R@1)", plot_ablations(groups, figures / "ablations.png"),
           "No ablation chart: fewer than two methods have finished runs with metrics.")
    section("Data scaling", scaling_table(groups),
            "No data-scaling table: fewer than two `data.fraction` values have finished runs (run `dmp study scaling`).")
    figure("Data scaling (R@1)", plot_scaling(groups, figures / "scaling.png"),
           "No data-scaling plot: fewer than two `data.fraction` values have finished runs.")

    labels = dict(zip(groups.frame["name"], groups.frame["label"]))
    loss_plot = plot_losses(histories or {}, labels, figures / "pretrain_losses.png")
    figure("Pretraining loss terms", loss_plot,
           "No loss curves: no pretraining history was found (reports/pretrain/history.csv or MLflow metric histories).")

    lines.extend(["## Retrieval gallery", ""])
    if gallery is None:
        lines.extend(["No gallery: reports/evaluate/scores.npz or the prepared test split is missing.", ""])
    else:
        for model in gallery.scores:
            path = plot_gallery(gallery, model, figures / f"gallery_{model}.png", queries=gallery_queries)
            lines.extend([f"### {model} {MODEL_TITLES.get(model, '')}".rstrip(), "", f"![gallery {model}](figures/{path.name})", ""])

    if not groups.frame.empty:
        section("Provenance", provenance_table(groups), "",
                "Each run: DVC experiment name, the params that differ from the workspace baseline, MLflow run ids.")
    md_path = out_dir / "results.md"
    write_text(md_path, "\n".join(lines).rstrip() + "\n")
    return md_path
