"""The evaluate stage: every named model scored on the test split (:mod:`retrieval`),
its diagnostics (:mod:`diagnostics`), the exact chance level, the files the report reads
and the test metrics logged to the training runs in MLflow.

Imports run one way: this module uses ``retrieval`` and ``diagnostics``; ``diagnostics``
uses ``retrieval``; ``retrieval`` uses neither."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from dmp_core.config import Config
from dmp_core.errors import DataError
from dmp_core.io import save_npz, write_json
from dmp_core.tracking import read_run_json, resolve_tracking_uri
from dmp_core.evaluation.retrieval import (SCORE_KEYS, RetrievalSplit, choose_rerank, encode_split,
                                           img2txt_from_txt2img, itc_similarity, load_model, pick_device,
                                           read_vocab_size, rerank_candidates, retrieval_metrics, retrieval_ranks,
                                           scorer_matrices)


def mlflow_values(entry: Mapping[str, Any]) -> dict[str, float]:
    """One model's details entry as flat MLflow metric names: ``itm_r_mean``,
    ``itc_tr_r1``, ``diag_itm_auc``, ``diag_image_use_gap`` ... (None values left out)."""
    values = {f"{scorer}_{k}": v for scorer in SCORE_KEYS for k, v in entry.get(scorer, {}).items()}
    choice = entry.get("rerank_choice", {})
    values |= {f"rerank_chosen_{k}": v for k, v in choice.items() if k in ("k", "itc_weight")}
    if "chosen_step" in choice.get("fit", {}):
        values["rerank_chosen_fit_step"] = choice["fit"]["chosen_step"]
    values |= {f"diag_{k}": v for k, v in entry.get("diagnostics", {}).items()}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v == v}


def log_to_mlflow(cfg: Config, details: Mapping[str, Any], reports_dir: str | Path, split: str) -> list[str]:
    """Add each model's metrics and diagnostics to its training run (id from
    ``reports/<stage>/run.json``) as ``<split>_<name>``.

    Returns one line per model saying what was done (printed by the stage)."""
    lines = []
    reports_dir = Path(reports_dir)
    for stage, entry in details["models"].items():
        values = mlflow_values(entry)
        run_json = reports_dir / stage / "run.json"
        if not run_json.is_file():
            lines.append(f"mlflow: {run_json} absent, {stage} metrics not logged to MLflow")
            continue
        run = read_run_json(run_json) or {}
        run_id = run.get("run_id")
        if not run_id:
            lines.append(f"mlflow: {run_json} has no run_id, {stage} metrics not logged to MLflow")
            continue
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.get("tracking_uri") or resolve_tracking_uri(cfg.tracking))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{split}_{k}", float(v), now, 0) for k, v in values.items()])
        lines.append(f"mlflow: logged {len(values)} {split} metrics to run {run_id} ({stage})")
    return lines


# ----------------------------------------------------------------------- the stage
# the residual re-ranker (ITC top-k re-ordered by w * ITC / tau + ITM margin); the seed's
# scorer, the ITM margin alone on the same candidates (ALBEF), is reported beside it
HEADLINE_SCORER = "rerank"
SEED_SCORER = "itm"
METRIC_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")


def headline_metrics(details: Mapping[str, Any]) -> dict[str, Any]:
    """The small ``metrics.json`` that `dvc exp show` lists (12 numbers, to keep the table
    readable): finetuned recall (headline scorer) with its ITC-only R mean, the zero-shot
    ITC R mean, and the fusion diagnostics the comparison depends on. Everything else is
    in ``details.json``."""
    models = details["models"]
    out: dict[str, Any] = {}
    if "finetune" in models:
        ft = models["finetune"]
        out["finetune"] = {k: ft[HEADLINE_SCORER][k] for k in METRIC_KEYS} | {
            "itc_r_mean": ft["itc"]["r_mean"], "itm_r_mean": ft[SEED_SCORER]["r_mean"]}
    if "pretrain" in models:  # zero-shot: ITC, the first-stage ranking every variant has
        out["pretrain"] = {"itc_r_mean": models["pretrain"]["itc"]["r_mean"]}
    diags = {}
    # (dvc exp show stays under 60 columns: the absolute image-use gap and the re-ranker's chosen
    # k and ITC weight are in details.json and MLflow, test_rerank_chosen_k / _itc_weight)
    for name, key in (("finetune", "itm_auc"), ("finetune", "itm_auc_random"),
                      ("pretrain", "image_use_gap_rel"), ("pretrain", "text_use_gap_rel")):
        if name in models:
            diags[f"{name}_{key}"] = models[name]["diagnostics"].get(key)
    out["diagnostics"] = diags
    return out


def tune_rerank(model: torch.nn.Module, cfg: Config, val: RetrievalSplit, train: RetrievalSplit,
                device: torch.device | str, val_clusters: np.ndarray | None = None) -> dict[str, Any]:
    """The residual re-ranker, fitted and chosen without the test split: its head refitted
    on ``train``'s ITC top-k groups (``eval.rerank_fit_*``, :mod:`rerank_fit`; written into
    ``model``), then its k and ITC weight chosen on the ``val`` split (``eval.rerank_ks`` x
    ``eval.rerank_itc_weights``; :func:`choose_rerank`), with the ``tau`` of the objective.
    With ``eval.rerank_gate``, a re-ranker whose val gain over ITC does not lie above its
    bootstrap noise (``val_clusters``: the val images' resampling units) is reset to ITC's
    order (:func:`gate_rerank`; ``"gate"`` in the result)."""
    from dmp_core.evaluation.rerank_fit import Corrector, bank_candidates, fit_rerank_head, gate_rerank, pair_bank

    ev = cfg.eval
    tau = cfg.objective.rerank_tau
    sizes = dict(batch_size=ev.batch_size, itm_batch_size=ev.itm_batch_size, chunk_size=ev.chunk_size, device=device)
    val_bank = pair_bank(model, val, max(ev.rerank_k_choices), **sizes)
    fit: dict[str, Any] = {"steps": 0}
    if ev.rerank_fit_steps:
        fit_split = train.subset(min(ev.rerank_fit_images, train.n_images))
        fit_bank = pair_bank(model, fit_split, ev.k_test, captions_per_image=ev.rerank_fit_captions, **sizes)
        fit = fit_rerank_head(model, fit_bank, val_bank,
                              steps=ev.rerank_fit_steps, lr=ev.rerank_fit_lr, batch=ev.rerank_fit_batch,
                              every=ev.rerank_fit_every, tau=tau, ks=ev.rerank_k_choices,
                              itc_weights=ev.rerank_itc_weights, seed=cfg.seed)
        choice = fit.pop("choice")
        fit["train_images"] = fit_split.n_images
    else:
        choice = choose_rerank(bank_candidates(val_bank, Corrector(model)), val_bank.sim_i2t, val.txt2img,
                               ev.rerank_k_choices, ev.rerank_itc_weights, tau)
    gate: dict[str, Any] = {}
    if ev.rerank_gate is not None:
        gate = {"gate": gate_rerank(model, val_bank, choice, tau=tau, level=ev.rerank_gate, clusters=val_clusters,
                                    seed=cfg.seed)}
        if not gate["gate"]["kept"]:  # the head is zero now: ITC's order, whatever k and w
            choice = choose_rerank(bank_candidates(val_bank, Corrector(model)), val_bank.sim_i2t, val.txt2img,
                                   ev.rerank_k_choices, ev.rerank_itc_weights, tau)
            if "chosen_step" in fit:
                fit["gated_step"], fit["chosen_step"] = fit["chosen_step"], 0
    return {**choice, "tau": tau, "split": "val", "val_images": val.n_images, "val_texts": val.n_texts, "fit": fit,
            **gate}


def run_evaluate(
    cfg: Config,
    prepared_dir: str | Path,
    models: Mapping[str, str | Path],
    reports_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
) -> dict[str, Any]:
    """Evaluate each named model (e.g. ``{"pretrain": ..., "finetune": ...}``) on ``eval.split``.

    Writes to ``<out_dir>`` (default ``<reports_dir>/evaluate``):

    * ``details.json``: the split (dataset, size, image size), the exact chance level,
      every recall of both scorers and the diagnostics of every model;
    * ``metrics.json``: the headline subset (:func:`headline_metrics`), the DVC metric;
    * ``ranks.npz``: per-query ranks ``<model>_<scorer>_tr`` [images] and ``_ir``
      [texts] plus ``txt2img`` [texts] and ``clusters`` int64 [images], the bootstrap's
      resampling unit of every image (0..C-1: a synthetic binding group is one cluster,
      any other image its own; ``arange(N)`` without groups) (small; the report's paired
      bootstrap reads them);
    * ``scores.npz``: the score matrices (``<model>_i2t`` ...; the last model's also as
      ``i2t``, ``t2i``, ``itc_i2t``, ``itc_t2i``) and ``txt2img``.

    ``reports_dir`` holds the ``<stage>/run.json`` files whose MLflow runs receive the
    metrics. Returns the details dict."""
    from dmp_core.evaluation.diagnostics import itm_auc, modality_gaps, rerank_moves
    from dmp_core.training.dataset import read_image_clusters, read_meta
    from dmp_core.losses.masking import SpecialTokens
    from dmp_core.stats import chance_recall

    if not models:
        raise DataError("run_evaluate: no models to evaluate")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else pick_device()
    out_dir = Path(out_dir) if out_dir is not None else Path(reports_dir) / "evaluate"
    data = RetrievalSplit.from_prepared(prepared_dir, cfg.eval.split)
    vocab_size = read_vocab_size(prepared_dir)
    special = SpecialTokens.from_meta(read_meta(prepared_dir))
    torch.manual_seed(cfg.seed)
    txt2img = np.asarray(data.txt2img, dtype=np.int64)
    img2txt = img2txt_from_txt2img(txt2img, data.n_images)

    details: dict[str, Any] = {
        "split": {"dataset": cfg.data.name, "name": cfg.eval.split, "image_size": cfg.data.image_size,
                  "images": data.n_images, "texts": data.n_texts},
        "k_test": cfg.eval.k_test,
        "headline_scorer": HEADLINE_SCORER,
        "chance": chance_recall(txt2img),
        "models": {},
    }
    arrays: dict[str, np.ndarray] = {}
    clusters = read_image_clusters(Path(prepared_dir) / cfg.eval.split, data.n_images)
    ranks: dict[str, np.ndarray] = {"txt2img": txt2img, "clusters": clusters}
    last: dict[str, np.ndarray] = {}
    val = RetrievalSplit.from_prepared(prepared_dir, "val")
    val_clusters = read_image_clusters(Path(prepared_dir) / "val", val.n_images) if cfg.eval.rerank_gate else None
    train = RetrievalSplit.from_prepared(prepared_dir, "train")
    for name, weights in models.items():
        model = load_model(cfg, weights, vocab_size, device)
        choice = tune_rerank(model, cfg, val, train, device, val_clusters)  # refits the re-ranking head in ``model``
        data_enc = encode_split(model, data, cfg.eval.batch_size, device)
        itc_i2t = itc_similarity(data_enc, cfg.eval.chunk_size)
        cands = rerank_candidates(model, data_enc, itc_i2t, cfg.eval.k_test, cfg.eval.itm_batch_size,
                                  cfg.eval.chunk_size)
        scores = {"itc_i2t": itc_i2t, "itc_t2i": np.ascontiguousarray(itc_i2t.T)}
        scores["i2t"], scores["t2i"] = scorer_matrices(cands, itc_i2t, HEADLINE_SCORER, k=choice["k"],
                                                       itc_weight=choice["itc_weight"], tau=choice["tau"])
        for scorer in ("itm", "itm_itc"):
            a, b = SCORE_KEYS[scorer]
            scores[a], scores[b] = scorer_matrices(cands, itc_i2t, scorer)
        entry: dict[str, Any] = {}
        for scorer, (a, b) in SCORE_KEYS.items():
            entry[scorer] = retrieval_metrics(scores[a], scores[b], txt2img, img2txt)
            tr, ir = retrieval_ranks(scores[a], scores[b], txt2img, img2txt)
            ranks[f"{name}_{scorer}_tr"], ranks[f"{name}_{scorer}_ir"] = tr.astype(np.int32), ir.astype(np.int32)
        entry["rerank_choice"] = choice
        diag = itm_auc(model, data_enc, itc_i2t, txt2img, k=cfg.eval.k_test, n_queries=cfg.eval.diag_queries,
                       itm_batch_size=cfg.eval.itm_batch_size, input_ids=data.input_ids)
        itc_ranks = (ranks[f"{name}_itc_tr"], ranks[f"{name}_itc_ir"])
        for scorer, k in ((HEADLINE_SCORER, choice["k"]), (SEED_SCORER, cfg.eval.k_test)):
            moved = (ranks[f"{name}_{scorer}_tr"], ranks[f"{name}_{scorer}_ir"])
            diag.update(rerank_moves(itc_ranks, moved, k, prefix=scorer))
        diag["rerank_k"], diag["rerank_itc_weight"] = choice["k"], choice["itc_weight"]
        diag["rerank_fit_step"] = choice["fit"].get("chosen_step", 0)
        if "gate" in choice:  # the val evidence the re-ranker was kept (1) or reset to ITC's order (0) on
            gate = choice["gate"]
            diag.update(rerank_val_gain=gate["diff"], rerank_val_gain_lo=gate["lo"], rerank_val_gain_hi=gate["hi"],
                        rerank_kept=int(gate["kept"]))
        diag.update(modality_gaps(model, data, cfg, special))
        entry["diagnostics"] = diag
        details["models"][name] = entry
        for key in ("i2t", "t2i", "itm_i2t", "itm_t2i", "itc_i2t", "itc_t2i"):
            arrays[f"{name}_{key}"] = scores[key]
        last = {key: scores[key] for key in ("i2t", "t2i", "itc_i2t", "itc_t2i")}
        del model, data_enc, cands
    arrays.update(last)
    arrays["txt2img"] = txt2img
    details["eval_seconds"] = round(time.perf_counter() - start, 1)

    save_npz(out_dir / "scores.npz", **arrays)
    save_npz(out_dir / "ranks.npz", **ranks)
    write_json(out_dir / "details.json", details)
    write_json(out_dir / "metrics.json", headline_metrics(details))
    if log_mlflow:
        for line in log_to_mlflow(cfg, details, reports_dir, cfg.eval.split):
            print(line, flush=True)
    return details


def summary_line(details: Mapping[str, Any]) -> Iterable[str]:
    for name, entry in details["models"].items():
        itm, itc, diag = entry["itm"], entry["itc"], entry["diagnostics"]
        gap = diag.get("text_use_gap")
        yield (
            f"{name}: ITM TR R@1/5/10 {itm['tr_r1']:.1f}/{itm['tr_r5']:.1f}/{itm['tr_r10']:.1f}"
            f"  IR {itm['ir_r1']:.1f}/{itm['ir_r5']:.1f}/{itm['ir_r10']:.1f}  R mean {itm['r_mean']:.1f}"
            f" (ITC {itc['r_mean']:.1f}); ITM AUC top-k {diag['itm_auc']:.3f} (random {diag['itm_auc_random']:.3f}), "
            f"image-use gap "
            f"{diag['image_use_gap']:.3f} nats" + (f", text-use gap {gap:.4f}" if gap is not None else "")
        )
