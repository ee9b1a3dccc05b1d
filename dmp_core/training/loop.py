"""The one training loop, for both stages (``pretrain`` and ``finetune``).

:func:`run_training` reads top to bottom as phases, plain functions of the run (a
:class:`TrainRun`: what set-up built) and of its :class:`TrainState` (step, history rows,
best val, timers):

- ``_set_up``: processes, model and Pretrainer, data, optimiser, schedule, checkpointer;
- ``_resume``: weights, optimiser, schedule and state from the last checkpoint if there
  is one (a complete one only has its outputs rewritten: ``_rewrite_finished``);
- ``_start``: DDP, autocast, progress, the MLflow run (``run.json``), the step RNGs;
- ``_train``: optimiser steps (``_train_step``: forward under autocast, backward, clip,
  step, temperature clamp, EMA update; ``_log_step``: the history row); every
  ``val_every`` steps (0 = each epoch end) ``_validate`` measures ITC recall on the val
  split and keeps the best weights; ``_save_checkpoint`` every ``checkpoint_every`` steps;
- ``_finish``: ``<out_dir>/model.safetensors`` (the best val weights),
  ``<reports_dir>/{history.csv, val_history.csv, metrics.json}``, MLflow; ``_close``.

Determinism and resume: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``; a resumed run skips the batches already consumed and restores every RNG
(torch, CUDA, numpy, python; one state per rank), so a run killed at any point and
restarted ends with the same weights and metrics as an uninterrupted one (on CPU).

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised from
the environment (nccl on CUDA, gloo on CPU), the model is wrapped in DDP, each rank
takes its slice of every global batch, and only rank 0 writes files and tracks.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dmp_core.training.checkpoint import Checkpointer, Resume, make_fingerprint, run_params
from dmp_core.config import Config, TrainParams, preset_spec
from dmp_core.errors import DataError, TrainingError
from dmp_core.io import atomic_path, write_json
from dmp_core.training.sampling import EpochBatchSampler, EpochItems, NeighbourBatchSampler, neighbour_table
from dmp_core.training.schedule import build_optimizer, build_scheduler

STAGES = ("pretrain", "finetune")
# metrics.json keys that measure the machine, not the run (differ between identical runs)
MACHINE_METRICS = ("wall_time_s", "pairs_per_s", "peak_rss_mb")


# ============================================================== distributed setup
class DistInfo:
    """Rank, world size and device of this process."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend, init_method="env://")
            self.owns_group = True
        if dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# ============================================================== seeds and RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the step touches, in types ``torch.load(weights_only=True)`` accepts."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [version, list(mt), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy/python seeded from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ============================================================== data order
def target_kinds(cfg: Config, stage: str) -> tuple[str, ...]:
    """Precomputed targets the stage's objectives read (HOG/pixel MIM targets only)."""
    if stage != "pretrain":
        return ()
    objectives = cfg.objective.resolve()
    return (objectives.mim_target,) if objectives.mim and objectives.mim_target in ("hog", "pixel") else ()


# ============================================================== validation recall
def itc_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt2img: np.ndarray) -> dict[str, float]:
    """TR/IR recall@1/5/10 (percent), their means and ``r_mean`` from ITC similarity."""
    from dmp_core.evaluation.retrieval import img2txt_from_txt2img, retrieval_metrics

    with torch.autocast(img_emb.device.type, enabled=False):  # float32 inside a bf16 region too
        sim = (img_emb.float() @ txt_emb.float().T).cpu().numpy()
    return retrieval_metrics(sim, sim.T, txt2img, img2txt_from_txt2img(txt2img, sim.shape[0]))


@torch.inference_mode()
def val_recall(model: torch.nn.Module, split: Any, batch_size: int, device: torch.device,
               autocast: Any, *, k: int = 16, auc_queries: int = 100, gap_pairs: int = 0,
               mask_ratio: float = 0.4, special: Any = None) -> dict[str, float]:
    """Encode the val images and captions once: ITC recall of the whole split, the per-query
    ITM AUCs (over the ITC top-``k``, and against random negatives) on ``auc_queries``
    images and captions and, with
    ``gap_pairs``, the image-use gap of MLM on that many pairs, so the curves show when the
    fusion starts to use the image."""
    from dmp_core.evaluation.diagnostics import image_use_gap, itm_auc
    from dmp_core.evaluation.retrieval import encode_split, itc_similarity

    was_training = model.training
    model.eval()
    try:
        with autocast:
            enc = encode_split(model, split, batch_size, device)
            sim = itc_similarity(enc)
            txt2img = np.asarray(split.txt2img)
            out = itc_recall(enc.image_emb, enc.text_emb, txt2img)
            auc = itm_auc(model, enc, sim, txt2img, k=k, n_queries=auc_queries, input_ids=split.input_ids)
            out["itm_auc"], out["itm_auc_random"] = auc["itm_auc"], auc["itm_auc_random"]
            if gap_pairs:
                out["image_use_gap"] = image_use_gap(model, split, n_pairs=gap_pairs, mask_ratio=mask_ratio,
                                                     special=special)["image_use_gap"]
    finally:
        model.train(was_training)
    return out


# ============================================================== small helpers
def train_params(cfg: Config, stage: str) -> TrainParams:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return cfg.pretrain if stage == "pretrain" else cfg.finetune


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 natively (x86 flags ``avx512_bf16`` or ``amx_bf16``);
    without them bf16 matmuls are emulated and slower than fp32 (bench/README.md, "bf16")."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def use_bf16(amp: str, device: torch.device, preset: str) -> bool:
    """``bf16``: always; ``off``: never; ``auto``: on CUDA, and on a CPU with native bf16 for
    the presets whose config says it pays there (``"cpu_bf16": true``: measured 1.85x on
    minilm_small, 1.04x on tiny; bench/README.md)."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(preset_spec(preset).get("cpu_bf16")) and cpu_has_native_bf16()


def amp_context(amp: str, device: torch.device, preset: str = "tiny") -> Any:
    """bf16 autocast where :func:`use_bf16` says so; fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(amp, device, preset) else nullcontext()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _first_bad_term(values: dict[str, float]) -> Optional[str]:
    for name, value in values.items():
        if name.startswith("loss_") and not math.isfinite(value):
            return name
    return "loss" if not math.isfinite(values["loss"]) else None


# ============================================================== the run and its state
@dataclass
class TrainRun:
    """What set-up builds for one stage run, shared by the phases; ``net``, ``autocast``,
    ``bar`` and ``tracker`` are filled in by :func:`_start` (after resume)."""

    cfg: Config
    stage: str
    train: TrainParams
    ddp: DistInfo
    log: Callable[[str], None]  # "[stage] ..." lines on stderr, rank 0 only
    out_dir: Path
    reports_dir: Path
    pretrainer: Any  # the stage's Pretrainer: the DMPModel, the losses, the EMA
    net: torch.nn.Module  # what the step calls: the pretrainer, DDP-wrapped when distributed
    n_train: int
    sampler: EpochBatchSampler
    loader: DataLoader
    val_split: Any  # the val RetrievalSplit on rank 0, None elsewhere
    total_steps: int
    val_every: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ckpt: Checkpointer
    autocast: Any = None
    bar: Any = None  # tqdm, when asked for
    tracker: Any = None  # MLflow Tracker on rank 0, NullTracker elsewhere

    @property
    def main(self) -> bool:
        return self.ddp.is_main

    @property
    def device(self) -> torch.device:
        return self.ddp.device

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def batch_pairs(self) -> int:
        return self.train.batch_size * self.ddp.world_size


@dataclass
class TrainState:
    """What the loop changes as it runs. Checkpoints save the step, the rows, the best val
    and the time and memory so far; :meth:`from_checkpoint` restores them.

    ``epoch``: the epoch of the current step; ``elapsed_before``/``peak_before``: wall time
    and peak memory of this run's earlier (killed) invocations; ``t_start``: when this one
    started training; ``t_last``: when the current step started; ``pairs_seen`` and
    ``train_time``: pairs and step seconds of this invocation (validation, checkpoints and
    logging excluded)."""

    step: int = 0
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    best_step: Optional[int] = None
    best_r_mean: float = -math.inf
    run_id: Optional[str] = None
    elapsed_before: float = 0.0
    peak_before: float = 0.0
    t_start: float = 0.0
    t_last: float = 0.0
    pairs_seen: int = 0
    train_time: float = 0.0

    @classmethod
    def from_checkpoint(cls, resume: Resume) -> TrainState:
        st = resume.state
        return cls(step=resume.step, history=st["history"], val_history=st["val_history"],
                   best_step=st["best"]["step"], best_r_mean=st["best"]["r_mean"], run_id=resume.run_id,
                   elapsed_before=st["elapsed_s"], peak_before=st["peak_rss_mb"])

    @property
    def best(self) -> dict[str, Any]:
        """As checkpoints store it."""
        return {"step": self.best_step, "r_mean": self.best_r_mean}

    def elapsed(self) -> float:
        """Wall time of the run so far, earlier invocations included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def pairs_per_s(self) -> float:
        return self.pairs_seen / max(self.train_time, 1e-9)

    def peak_rss(self) -> float:
        """The training processes' peak memory, earlier invocations included."""
        return max(peak_rss_mb(), self.peak_before)


# ============================================================== the loop
@contextmanager
def deterministic_on_cpu() -> Iterator[None]:
    """Deterministic kernels on CPU for the duration of a run (restored afterwards).

    Without this, two identical CPU runs differ from the second step on by ~1e-6 (the
    backward of advanced indexing accumulates in a thread-dependent order); measured
    on this project's tiny preset. Not applied on CUDA, where it would need
    CUBLAS_WORKSPACE_CONFIG and cost speed."""
    import torch.utils.deterministic as det

    before, fill_before = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    cpu = not torch.cuda.is_available()
    if cpu:
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = False  # NaN-filling every torch.empty cost ~14% of a step
    try:
        yield
    finally:
        if cpu:
            torch.use_deterministic_algorithms(before)
            det.fill_uninitialized_memory = fill_before


def run_training(cfg: Config, stage: str, *, prepared_dir: str | Path, targets_dir: str | Path | None,
                 out_dir: str | Path, reports_dir: str | Path, init_weights: str | Path | None = None,
                 upstream_run: str | Path | None = None, progress: Optional[bool] = None) -> dict[str, Any]:
    """Train one stage; returns the metrics written to ``<reports_dir>/metrics.json``.

    ``init_weights``: DMPModel safetensors to start from (finetune: the pretrained model).
    ``upstream_run``: the upstream stage's ``run.json`` (its MLflow run id becomes a tag).
    ``progress``: tqdm bar (default: when stderr is a terminal) instead of log lines."""
    with deterministic_on_cpu():
        return _run_training(cfg, stage, prepared_dir=prepared_dir, targets_dir=targets_dir, out_dir=out_dir,
                             reports_dir=reports_dir, init_weights=init_weights, upstream_run=upstream_run,
                             progress=progress)


def _run_training(cfg: Config, stage: str, *, prepared_dir: str | Path, targets_dir: str | Path | None,
                  out_dir: str | Path, reports_dir: str | Path, init_weights: str | Path | None,
                  upstream_run: str | Path | None, progress: Optional[bool]) -> dict[str, Any]:
    """The phases, in order: set up, resume, start, train, finish (rank 0 writes), close."""
    run = _set_up(cfg, stage, prepared_dir, targets_dir, out_dir, reports_dir, init_weights)
    state, resume = _resume(run)
    if resume is not None and resume.done:
        return _rewrite_finished(run, state, resume)
    _start(run, state, resume, upstream_run=upstream_run, progress=progress)
    status = "FAILED"
    try:
        _train(run, state)
        metrics = _finish(run, state)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close(run, status)
    return metrics


# ---------------------------------------------------------------- set up
def _set_up(cfg: Config, stage: str, prepared_dir: str | Path, targets_dir: str | Path | None,
            out_dir: str | Path, reports_dir: str | Path, init_weights: str | Path | None) -> TrainRun:
    """Config, processes, model and Pretrainer, data, optimiser and schedule, checkpointer."""
    from dmp_core.evaluation.retrieval import RetrievalSplit

    train = train_params(cfg, stage)
    prepared_dir, out_dir, reports_dir = Path(prepared_dir), Path(out_dir), Path(reports_dir)
    ddp = DistInfo()
    # tqdm.write keeps log lines from breaking a progress bar (and is a plain print without one)
    log = (lambda msg: tqdm.write(f"[{stage}] {msg}", file=sys.stderr)) if ddp.is_main else (lambda msg: None)
    pretrainer = _build_pretrainer(cfg, stage, prepared_dir, init_weights, ddp)
    dataset, sampler, loader = _build_data(cfg, stage, train, prepared_dir, targets_dir, ddp, pretrainer, log)
    val_split = RetrievalSplit.from_prepared(prepared_dir, "val") if ddp.is_main else None

    # `steps`: that many optimiser steps whatever the data size (epochs repeat as needed);
    # `epochs`: full passes (the incomplete last batch of each epoch is dropped)
    total_steps = train.steps if train.steps is not None else train.epochs * sampler.steps_per_epoch
    optimizer = build_optimizer(pretrainer, train)
    scheduler = build_scheduler(optimizer, train, total_steps=total_steps)
    ckpt = Checkpointer(out_dir / "checkpoints",
                        make_fingerprint(cfg, stage, n_train=len(dataset), world_size=ddp.world_size,
                                         init_weights=init_weights),
                        run_params(cfg, stage))
    return TrainRun(cfg=cfg, stage=stage, train=train, ddp=ddp, log=log, out_dir=out_dir, reports_dir=reports_dir,
                    pretrainer=pretrainer, net=pretrainer, n_train=len(dataset), sampler=sampler, loader=loader,
                    val_split=val_split, total_steps=total_steps,
                    val_every=train.val_every or sampler.steps_per_epoch,
                    optimizer=optimizer, scheduler=scheduler, ckpt=ckpt)


def _build_pretrainer(cfg: Config, stage: str, prepared_dir: Path, init_weights: str | Path | None,
                      ddp: DistInfo) -> torch.nn.Module:
    """The DMPModel (from ``init_weights`` when given) inside the stage's Pretrainer, on the device."""
    from dmp_core.models import load_weights, model_from_config
    from dmp_core.training.dataset import read_meta
    from dmp_core.training.meta_arch import create_pretrainer

    seed_everything(cfg.seed)  # identical initial weights on every rank
    meta = read_meta(prepared_dir)
    # with init_weights the pretrained towers would be overwritten anyway: skip loading them
    model = model_from_config(cfg, int(meta["vocab_size"]), pretrained=False if init_weights is not None else None)
    if init_weights is not None:
        load_weights(model, init_weights, missing_hint="run the pretrain stage first")
    return create_pretrainer(cfg, stage, model, meta=meta, world_size=ddp.world_size).to(ddp.device)


def pretrain_images(num_images: int, data_fraction: float, seed: int) -> np.ndarray:
    """The nested share of the training images that pretraining sees: the first
    ``ceil(data_fraction * N)`` of one seeded ranking (the ranking of ``data.fraction``,
    :func:`~dmp_core.data.preprocess.fraction_subset`), so 0.25 is a subset of 0.5."""
    from dmp_core.data.preprocess import fraction_subset

    return fraction_subset(num_images, data_fraction, seed)


def _build_data(cfg: Config, stage: str, train: TrainParams, prepared_dir: Path, targets_dir: str | Path | None,
                ddp: DistInfo, pretrainer: Any, log: Callable[[str], None]) -> tuple[Dataset, EpochBatchSampler, DataLoader]:
    """The train split, its resumable sampler (this rank's slice of each global batch), the loader.

    With ``neighbour_batches`` G > 1 each batch is groups of G mutual ITC neighbours by the
    stage's initial model (:class:`NeighbourBatchSampler`), else a random permutation."""
    from dmp_core.training.dataset import ImageSubset, PairDataset

    dataset: Any = PairDataset(prepared_dir, "train", targets_dir=targets_dir, target_kinds=target_kinds(cfg, stage),
                               captions=train.captions, seed=cfg.seed)
    if stage == "pretrain" and cfg.pretrain.data_fraction < 1.0:  # the seed's axis: finetuning sees every image
        total = dataset.num_images
        dataset = ImageSubset(dataset, pretrain_images(total, cfg.pretrain.data_fraction, cfg.seed))
        log(f"pretrain.data_fraction={cfg.pretrain.data_fraction:g}: pretraining sees {dataset.num_images} of the "
            f"{total} training images ({len(dataset)} pairs)")
    if train.neighbour_batches > 1:
        start = time.perf_counter()
        table = neighbour_table(pretrainer.model, dataset, pool=train.neighbour_pool, device=ddp.device)
        item_image = np.array([dataset.image_of_item(i) for i in range(len(dataset))])
        sampler = NeighbourBatchSampler(len(dataset), train.batch_size, seed=cfg.seed, item_image=item_image,
                                        neighbours=table, group=train.neighbour_batches, rank=ddp.rank,
                                        world_size=ddp.world_size)
        log(f"neighbour batches: groups of {train.neighbour_batches} from each image's {table.shape[1]} ITC "
            f"neighbours ({time.perf_counter() - start:.1f} s to embed {dataset.num_images} training images)")
    else:
        sampler = EpochBatchSampler(len(dataset), train.batch_size, seed=cfg.seed, rank=ddp.rank,
                                    world_size=ddp.world_size)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{prepared_dir / 'train'}: {len(dataset)} training pairs, fewer than one batch of "
                        f"{stage}.batch_size={train.batch_size} x {ddp.world_size} process(es)")
    workers = train.num_workers
    loader = DataLoader(EpochItems(dataset), batch_sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=ddp.device.type == "cuda",
                        worker_init_fn=_seed_worker if workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        prefetch_factor=4 if workers > 0 else None)
    return dataset, sampler, loader


# ---------------------------------------------------------------- resume
def _resume(run: TrainRun) -> tuple[TrainState, Optional[Resume]]:
    """Weights, optimiser, schedule and TrainState from the checkpoint folder, or a fresh state.

    The RNG states are restored last, by :func:`_start`."""
    from dmp_core.tracking import close_orphan_run

    # a run killed before its first checkpoint left its MLflow run RUNNING: end it as KILLED
    # (its id is kept in the checkpoints folder, which DVC does not delete between runs)
    run_record = run.ckpt.folder / "run.json"
    if run.main and not run.ckpt.latest_path.is_file() and run_record.is_file():
        message = close_orphan_run(run_record, run.cfg)
        if message:
            run.log(message)
    resume = run.ckpt.load(run.pretrainer)
    if resume is None:
        return TrainState(), None
    run.optimizer.load_state_dict(resume.state["optimizer"])
    run.scheduler.load_state_dict(resume.state["scheduler"])
    state = TrainState.from_checkpoint(resume)
    if not resume.done:
        run.log(f"resuming from {run.ckpt.latest_path} at step {state.step}/{run.total_steps}")
    return state, resume


def _rewrite_finished(run: TrainRun, state: TrainState, resume: Resume) -> dict[str, Any]:
    """A complete checkpoint: write the outputs again from it, without training or tracking."""
    run.log(f"{run.ckpt.latest_path} says this run is complete (step {state.step}); rewriting outputs")
    if run.main:
        _write_outputs(run, state, resume.state["pairs_per_s"], state.elapsed_before, state.peak_before)
        write_json(run.reports_dir / "run.json", resume.state["run_info"])
    run.ddp.barrier()
    run.ddp.close()
    return json.loads((run.reports_dir / "metrics.json").read_text()) if run.main else {}


# ---------------------------------------------------------------- start
def _start(run: TrainRun, state: TrainState, resume: Optional[Resume], *, upstream_run: str | Path | None,
           progress: Optional[bool]) -> None:
    """DDP wrap, autocast, progress bar and header line, the MLflow run, then the step RNGs."""
    from dmp_core.tracking import NullTracker, Tracker, read_run_json, write_run_json

    if run.ddp.world_size > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.pretrainer, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=True)  # finetune leaves the MLM head unused
    run.autocast = amp_context(run.train.amp, run.device, run.cfg.model.preset)
    use_bar = progress if progress is not None else sys.stderr.isatty()
    if run.main and use_bar:
        run.bar = tqdm(total=run.total_steps, initial=state.step, desc=run.stage, unit="step", dynamic_ncols=True)
    run.log(f"{run.n_train} pairs, {run.steps_per_epoch} steps/epoch, {run.total_steps} steps "
            f"({run.total_steps / run.steps_per_epoch:.2f} epochs) of {run.batch_pairs} pairs on {run.device} "
            f"({'bf16 autocast' if use_bf16(run.train.amp, run.device, run.cfg.model.preset) else 'fp32'}) "
            f"(world size {run.ddp.world_size})")

    upstream = read_run_json(upstream_run) if upstream_run else None
    run.tracker = NullTracker()
    if run.main:
        run.tracker = Tracker(run.cfg, run.stage, run_id=state.run_id,
                              upstream_run_id=(upstream or {}).get("run_id"))
        write_run_json(run.reports_dir, run.tracker, stage=run.stage)
        write_run_json(run.ckpt.folder, run.tracker, stage=run.stage)  # for close_orphan_run after a kill

    state.t_start = time.perf_counter()
    if resume is None:
        seed_everything(run.cfg.seed + run.ddp.rank)  # masking and ITM sampling differ per rank
    else:
        set_rng_state(resume.state["rng"][run.ddp.rank])  # exactly where the checkpoint left off


# ---------------------------------------------------------------- train
def _train(run: TrainRun, state: TrainState) -> None:
    """Optimiser steps until ``total_steps``; after each: log, maybe validate, maybe checkpoint."""
    run.pretrainer.train()
    while state.step < run.total_steps:
        state.epoch, start_batch = divmod(state.step, run.steps_per_epoch)
        run.sampler.set_position(state.epoch, start_batch)
        state.t_last = time.perf_counter()
        for batch in run.loader:
            terms, ema_decay = _train_step(run, state, batch)
            _log_step(run, state, terms, ema_decay)
            validated = state.step % run.val_every == 0 or state.step == run.total_steps
            if validated:
                _validate(run, state)
            if state.step == run.total_steps:
                break
            if validated or state.step % run.train.checkpoint_every == 0:
                _save_checkpoint(run, state, done=False)
            state.t_last = time.perf_counter()


def _train_step(run: TrainRun, state: TrainState, batch: dict[str, torch.Tensor]
                ) -> tuple[dict[str, float], Optional[float]]:
    """Schedule, forward under autocast (the Pretrainer returns the weighted total and every
    term), backward, clip, the finite check, optimiser step, temperature clamp, EMA update.
    Returns the loss/diagnostic values and the EMA decay."""
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    run.scheduler.step_update(state.step)
    run.pretrainer.progress = state.step / run.total_steps
    with run.autocast:
        out = run.net(batch)
    run.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if run.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.pretrainer.parameters(), run.train.grad_clip)

    # one sync per step: the values are logged anyway; a non-finite term stops the run
    names = [k for k in out if k == "loss" or k.startswith(("loss_", "diag_"))]
    terms = dict(zip(names, torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()))
    _stop_if_not_finite(run, state, terms)
    run.optimizer.step()
    run.pretrainer.model.clamp_temperature_()  # in place after the step (ALBEF)
    state.step += 1
    return terms, run.pretrainer.update_ema(state.step)


def _stop_if_not_finite(run: TrainRun, state: TrainState, terms: dict[str, float]) -> None:
    """TrainingError naming the first non-finite term, on every rank at once."""
    bad = _first_bad_term(terms)
    if run.ddp.world_size > 1:  # every rank stops together
        flag = torch.tensor([0.0 if bad is None else 1.0], device=run.device)
        dist.all_reduce(flag)
        bad = bad or ("loss (on another rank)" if flag.item() > 0 else None)
    if bad is not None:
        raise TrainingError(f"{run.stage}: non-finite {bad}={terms.get(bad, math.nan)} at step {state.step + 1} "
                            f"(epoch {state.epoch}); last good checkpoint: {run.ckpt.last_checkpoint_name()}")


def _log_step(run: TrainRun, state: TrainState, terms: dict[str, float], ema_decay: Optional[float]) -> None:
    """The step's row: history, MLflow (flushed every ``log_every``), progress bar or log line."""
    now = time.perf_counter()
    state.pairs_seen += run.batch_pairs
    state.train_time += now - state.t_last
    row = {"step": state.step, "epoch": state.epoch, "lr": run.optimizer.param_groups[0]["lr"], **terms,
           "temperature": float(run.pretrainer.model.temperature.detach()),
           "pairs_per_s": run.batch_pairs / max(now - state.t_last, 1e-9)}
    if ema_decay is not None:
        row["ema_decay"] = ema_decay
    state.history.append(row)
    run.tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, state.step)
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in terms.items()
                             if k.startswith("loss")} | {"pairs/s": f"{row['pairs_per_s']:.0f}"})
    if state.step % run.train.log_every == 0 or state.step == run.total_steps:
        run.tracker.flush()
        if run.bar is None:
            loss_txt = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if k.startswith("loss"))
            run.log(f"step {state.step}/{run.total_steps} epoch {state.epoch} lr {row['lr']:.2e} {loss_txt} "
                    f"{row['pairs_per_s']:.0f} pairs/s")


# ---------------------------------------------------------------- validate
def _validate(run: TrainRun, state: TrainState) -> None:
    """Rank 0: val recall (and ITM/image-use diagnostics), a val row, MLflow, the best weights
    when ``r_mean`` improves. Then every rank waits for it."""
    if run.main:
        ev = run.cfg.eval
        recall = val_recall(run.pretrainer.model, run.val_split, ev.batch_size, run.device, run.autocast,
                            k=ev.k_test, auc_queries=min(ev.diag_queries, 100), gap_pairs=min(ev.diag_pairs, 128),
                            mask_ratio=ev.gap_text_mask_ratio, special=run.pretrainer.special)
        state.val_history.append({"step": state.step, **recall})
        run.tracker.log_metrics({f"val_{k}": v for k, v in recall.items()}, state.step)
        improved = recall["r_mean"] > state.best_r_mean
        if improved:
            state.best_step, state.best_r_mean = state.step, recall["r_mean"]
            run.ckpt.save_best(run.pretrainer.model)
        run.log(f"step {state.step}: val r_mean {recall['r_mean']:.2f} (tr {recall['tr_mean']:.2f}, "
                f"ir {recall['ir_mean']:.2f}), ITM AUC top-k {recall['itm_auc']:.3f} "
                f"(random {recall['itm_auc_random']:.3f}), image-use gap "
                f"{recall['image_use_gap']:.3f}" + (" best" if improved else ""))
    run.ddp.barrier()


# ---------------------------------------------------------------- checkpoint
def _save_checkpoint(run: TrainRun, state: TrainState, done: bool, wall_time: Optional[float] = None,
                     peak: Optional[float] = None) -> None:
    """Every rank's RNG state gathered; rank 0 writes the step atomically (``Checkpointer.save``:
    step files first, ``latest.json`` last); then every rank waits for it."""
    rng = [rng_state()]
    if run.ddp.world_size > 1:
        rng = [None] * run.ddp.world_size
        dist.all_gather_object(rng, rng_state())
    if run.main:
        resume_state = {
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng,
            "history": state.history, "val_history": state.val_history, "best": state.best,
            "run_info": {**run.tracker.run_info(), "stage": run.stage},
            "elapsed_s": state.elapsed() if wall_time is None else wall_time,
            "pairs_per_s": state.pairs_per_s(),
            # the training processes' peak, kept so that rewritten outputs report it
            "peak_rss_mb": state.peak_rss() if peak is None else peak,
            "epoch": state.step // run.steps_per_epoch, "batch_in_epoch": state.step % run.steps_per_epoch}
        run.ckpt.save(run.pretrainer, resume_state, step=state.step, done=done, run_id=run.tracker.run_id,
                      best_step=state.best_step)
    run.ddp.barrier()


# ---------------------------------------------------------------- outputs
def _finish(run: TrainRun, state: TrainState) -> dict[str, Any]:
    """The final (``done``) checkpoint; on rank 0 the outputs, their final metrics and artifacts
    in MLflow. Returns the metrics (``{}`` on other ranks)."""
    wall_time, peak = state.elapsed(), state.peak_rss()
    _save_checkpoint(run, state, done=True, wall_time=wall_time, peak=peak)
    if not run.main:
        return {}
    metrics = _write_outputs(run, state, state.pairs_per_s(), wall_time, peak)
    run.tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            state.step)
    run.tracker.log_artifact(run.out_dir / "model.safetensors", "model")
    run.tracker.log_artifact(run.reports_dir / "metrics.json", "reports")
    return metrics


def _close(run: TrainRun, status: str) -> None:
    """Whatever happened: close the bar, end the MLflow run with ``status``, leave the group."""
    if run.bar is not None:
        run.bar.close()
    run.tracker.end(status)
    run.ddp.close()


def history_frame(history: list[dict], stage: str) -> pd.DataFrame:
    """One row per step with EVERY loss column of the stage (empty where the run does not
    use a term), so `dvc plots` can plot each term for every variant without warnings."""
    from dmp_core.training.meta_arch import LOSS_TERMS

    frame = pd.DataFrame(history)
    for term in LOSS_TERMS[stage]:
        if f"loss_{term}" not in frame:
            frame[f"loss_{term}"] = np.nan
    first = ["step", "epoch", "lr", "loss"] + [f"loss_{t}" for t in LOSS_TERMS[stage]]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


def _write_outputs(run: TrainRun, state: TrainState, pairs_per_s: float, wall_time: float,
                   peak_rss: float) -> dict[str, Any]:
    """``model.safetensors`` (best val weights), ``history.csv``, ``val_history.csv``, ``metrics.json``."""
    out_dir, reports_dir = run.out_dir, run.reports_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        shutil.copyfile(run.ckpt.best_path, tmp)
    reports_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(reports_dir / "history.csv") as tmp:
        history_frame(state.history, run.stage).to_csv(tmp, index=False)
    with atomic_path(reports_dir / "val_history.csv") as tmp:
        pd.DataFrame(state.val_history).to_csv(tmp, index=False)
    final_val = state.val_history[-1]
    best_val = next(v for v in state.val_history if v["step"] == state.best_step)
    last = state.history[-1]
    metrics: dict[str, Any] = {
        "steps": state.step,
        "epochs": state.step / run.steps_per_epoch,
        "best_step": state.best_step,
        "val_r_mean_best": best_val["r_mean"],
        "val_r_mean_final": final_val["r_mean"],
        "val_best": {k: v for k, v in best_val.items() if k != "step"},
        "val_final": {k: v for k, v in final_val.items() if k != "step"},
        "loss_final": {k: v for k, v in last.items() if k.startswith("loss")},
        "wall_time_s": round(wall_time, 2),
        "pairs_per_s": round(pairs_per_s, 1),
        "peak_rss_mb": round(peak_rss, 1),
    }
    write_json(reports_dir / "metrics.json", metrics)
    return metrics
