"""The one training loop, for both stages (``pretrain`` and ``finetune``).

Read top to bottom: set up (distributed, seeds, model, data, optimiser, schedule),
resume from the last checkpoint if there is one, then loop over optimiser steps:
forward (the Pretrainer returns the weighted total and every term), backward, clip,
step, EMA update, log; every ``val_every`` steps (0 = each epoch end) measure ITC
recall on the val split and keep the best weights; checkpoint every
``checkpoint_every`` steps. At the end write ``<out_dir>/model.safetensors`` (the best
val weights) and ``<reports_dir>/{history.csv, metrics.json, run.json}``.

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
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dmp_core.training.checkpoint import Checkpointer, make_fingerprint, run_params
from dmp_core.config import Config, TrainParams, preset_spec
from dmp_core.errors import DataError, TrainingError
from dmp_core.io import atomic_path, write_json
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
class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of a per-epoch permutation seeded by ``(seed, epoch)``, resumable mid-epoch.

    Global batch ``b`` of epoch ``e`` is ``perm[b*B*W:(b+1)*B*W]`` and rank ``r`` takes its
    ``r``-th slice of ``B``, so the union over ranks is the single-process batch of size
    ``B*W``. The incomplete last batch is dropped (contrastive losses need full batches).
    Items are ``(epoch, index)`` so that persistent workers learn the epoch too."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n_items // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_items, generator=gen)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.steps_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in perm[first:first + self.batch_size].tolist()]


class EpochItems(Dataset):
    """Wraps a PairDataset: item ``(epoch, index)`` sets the dataset's epoch, then reads."""

    def __init__(self, dataset: Any):
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


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
    from dmp_core.training.dataset import PairDataset, read_meta
    from dmp_core.evaluation.retrieval import RetrievalSplit
    from dmp_core.training.meta_arch import create_pretrainer
    from dmp_core.models import load_weights, model_from_config
    from dmp_core.tracking import NullTracker, Tracker, close_orphan_run, read_run_json, write_run_json

    train = train_params(cfg, stage)
    prepared_dir, out_dir, reports_dir = Path(prepared_dir), Path(out_dir), Path(reports_dir)
    ddp_info = DistInfo()
    device, main = ddp_info.device, ddp_info.is_main
    # tqdm.write keeps log lines from breaking a progress bar (and is a plain print without one)
    log = (lambda msg: tqdm.write(f"[{stage}] {msg}", file=sys.stderr)) if main else (lambda msg: None)

    # ---------------------------------------------------------------- model
    seed_everything(cfg.seed)  # identical initial weights on every rank
    meta = read_meta(prepared_dir)
    # with init_weights the pretrained towers would be overwritten anyway: skip loading them
    model = model_from_config(cfg, int(meta["vocab_size"]), pretrained=False if init_weights is not None else None)
    if init_weights is not None:
        load_weights(model, init_weights, missing_hint="run the pretrain stage first")
    pretrainer = create_pretrainer(cfg, stage, model, meta=meta, world_size=ddp_info.world_size).to(device)

    # ---------------------------------------------------------------- data
    dataset = PairDataset(prepared_dir, "train", targets_dir=targets_dir, target_kinds=target_kinds(cfg, stage),
                          captions=train.captions, seed=cfg.seed)
    sampler = EpochBatchSampler(len(dataset), train.batch_size, seed=cfg.seed, rank=ddp_info.rank,
                                world_size=ddp_info.world_size)
    if sampler.steps_per_epoch == 0:
        raise DataError(f"{prepared_dir / 'train'}: {len(dataset)} training pairs, fewer than one batch of "
                        f"{stage}.batch_size={train.batch_size} x {ddp_info.world_size} process(es)")
    workers = train.num_workers
    loader = DataLoader(EpochItems(dataset), batch_sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        worker_init_fn=_seed_worker if workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.seed),
                        prefetch_factor=4 if workers > 0 else None)
    val_split = RetrievalSplit.from_prepared(prepared_dir, "val") if main else None

    steps_per_epoch = sampler.steps_per_epoch
    # `steps`: that many optimiser steps whatever the data size (epochs repeat as needed);
    # `epochs`: full passes (the incomplete last batch of each epoch is dropped)
    total_steps = train.steps if train.steps is not None else train.epochs * steps_per_epoch
    val_every = train.val_every or steps_per_epoch

    # ---------------------------------------------------------------- optimiser
    optimizer = build_optimizer(pretrainer, train)
    scheduler = build_scheduler(optimizer, train, total_steps=total_steps)

    # ---------------------------------------------------------------- resume
    ckpt = Checkpointer(out_dir / "checkpoints",
                        make_fingerprint(cfg, stage, n_train=len(dataset), world_size=ddp_info.world_size,
                                         init_weights=init_weights),
                        run_params(cfg, stage))
    # a run killed before its first checkpoint left its MLflow run RUNNING: end it as KILLED
    # (its id is kept in the checkpoints folder, which DVC does not delete between runs)
    run_record = ckpt.folder / "run.json"
    if main and not ckpt.latest_path.is_file() and run_record.is_file():
        message = close_orphan_run(run_record, cfg)
        if message:
            log(message)
    resume = ckpt.load(pretrainer)
    step, history, val_history = 0, [], []
    best = {"step": None, "r_mean": -math.inf}
    elapsed_before, run_id, peak_before = 0.0, None, 0.0
    if resume is not None:
        st = resume.state
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        step, history, val_history, best = resume.step, st["history"], st["val_history"], st["best"]
        elapsed_before, run_id = st["elapsed_s"], resume.run_id
        peak_before = st["peak_rss_mb"]
        if resume.done:
            log(f"{ckpt.latest_path} says this run is complete (step {step}); rewriting outputs")
            if main:
                _write_outputs(ckpt, stage, out_dir, reports_dir, history, val_history, best, step, steps_per_epoch,
                               st["pairs_per_s"], elapsed_before, st["peak_rss_mb"])
                write_json(reports_dir / "run.json", st["run_info"])
            ddp_info.barrier()
            ddp_info.close()
            return json.loads((reports_dir / "metrics.json").read_text()) if main else {}
        log(f"resuming from {ckpt.latest_path} at step {step}/{total_steps}")

    net: torch.nn.Module = pretrainer
    if ddp_info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            pretrainer, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # finetune leaves the MLM head unused

    autocast = amp_context(train.amp, device, cfg.model.preset)
    batch_pairs = train.batch_size * ddp_info.world_size
    use_bar = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if main and use_bar:
        bar = tqdm(total=total_steps, initial=step, desc=stage, unit="step", dynamic_ncols=True)
    log(f"{len(dataset)} pairs, {steps_per_epoch} steps/epoch, {total_steps} steps "
        f"({total_steps / steps_per_epoch:.2f} epochs) of {batch_pairs} pairs on {device} "
        f"({'bf16 autocast' if use_bf16(train.amp, device, cfg.model.preset) else 'fp32'}) "
        f"(world size {ddp_info.world_size})")

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save_checkpoint(done: bool, wall_time: Optional[float] = None, peak: Optional[float] = None) -> None:
        rng = [rng_state()]
        if ddp_info.world_size > 1:
            rng = [None] * ddp_info.world_size
            dist.all_gather_object(rng, rng_state())
        if main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                     "history": history, "val_history": val_history, "best": best,
                     "run_info": {**tracker.run_info(), "stage": stage},
                     "elapsed_s": elapsed() if wall_time is None else wall_time,
                     "pairs_per_s": pairs_seen / max(train_time, 1e-9),
                     # the training processes' peak, kept so that rewritten outputs report it
                     "peak_rss_mb": max(peak_rss_mb(), peak_before) if peak is None else peak,
                     "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch}
            ckpt.save(pretrainer, state, step=step, done=done, run_id=tracker.run_id, best_step=best["step"])
        ddp_info.barrier()

    def validate() -> None:
        if main:
            recall = val_recall(pretrainer.model, val_split, cfg.eval.batch_size, device, autocast,
                                k=cfg.eval.k_test, auc_queries=min(cfg.eval.diag_queries, 100),
                                gap_pairs=min(cfg.eval.diag_pairs, 128),
                                mask_ratio=cfg.eval.gap_text_mask_ratio, special=pretrainer.special)
            val_history.append({"step": step, **recall})
            tracker.log_metrics({f"val_{k}": v for k, v in recall.items()}, step)
            improved = recall["r_mean"] > best["r_mean"]
            if improved:
                best.update(step=step, r_mean=recall["r_mean"])
                ckpt.save_best(pretrainer.model)
            log(f"step {step}: val r_mean {recall['r_mean']:.2f} (tr {recall['tr_mean']:.2f}, "
                f"ir {recall['ir_mean']:.2f}), ITM AUC top-k {recall['itm_auc']:.3f} "
                f"(random {recall['itm_auc_random']:.3f}), image-use gap "
                f"{recall['image_use_gap']:.3f}" + (" best" if improved else ""))
        ddp_info.barrier()

    # ---------------------------------------------------------------- tracking
    upstream = read_run_json(upstream_run) if upstream_run else None
    tracker = NullTracker()
    if main:
        tracker = Tracker(cfg, stage, run_id=run_id, upstream_run_id=(upstream or {}).get("run_id"))
        write_run_json(reports_dir, tracker, stage=stage)
        write_run_json(run_record.parent, tracker, stage=stage)  # for close_orphan_run after a kill

    # ---------------------------------------------------------------- train
    t_start = time.perf_counter()
    pairs_seen, train_time = 0, 0.0
    status = "FAILED"
    if resume is None:
        seed_everything(cfg.seed + ddp_info.rank)  # masking and ITM sampling differ per rank
    else:
        set_rng_state(resume.state["rng"][ddp_info.rank])  # exactly where the checkpoint left off
    try:
        pretrainer.train()
        while step < total_steps:
            epoch, start_batch = divmod(step, steps_per_epoch)
            sampler.set_position(epoch, start_batch)
            t_last = time.perf_counter()
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                scheduler.step_update(step)
                pretrainer.progress = step / total_steps
                with autocast:
                    out = net(batch)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(pretrainer.parameters(), train.grad_clip)

                # one sync per step: the values are logged anyway; a non-finite term stops the run
                names = [k for k in out if k == "loss" or k.startswith(("loss_", "diag_"))]
                terms = dict(zip(names, torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()))
                bad = _first_bad_term(terms)
                if ddp_info.world_size > 1:  # every rank stops together
                    flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
                    dist.all_reduce(flag)
                    bad = bad or ("loss (on another rank)" if flag.item() > 0 else None)
                if bad is not None:
                    raise TrainingError(f"{stage}: non-finite {bad}={terms.get(bad, math.nan)} at step {step + 1} "
                                        f"(epoch {epoch}); last good checkpoint: {ckpt.last_checkpoint_name()}")
                optimizer.step()
                pretrainer.model.clamp_temperature_()  # in place after the step (ALBEF)
                step += 1
                ema_decay = pretrainer.update_ema(step)

                now = time.perf_counter()
                pairs_seen += batch_pairs
                train_time += now - t_last
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **terms,
                       "temperature": float(pretrainer.model.temperature.detach()),
                       "pairs_per_s": batch_pairs / max(now - t_last, 1e-9)}
                if ema_decay is not None:
                    row["ema_decay"] = ema_decay
                history.append(row)
                tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3g}" for k, v in terms.items()
                                     if k.startswith("loss")} | {"pairs/s": f"{row['pairs_per_s']:.0f}"})
                if step % train.log_every == 0 or step == total_steps:
                    tracker.flush()
                    if bar is None:
                        loss_txt = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if k.startswith("loss"))
                        log(f"step {step}/{total_steps} epoch {epoch} lr {row['lr']:.2e} {loss_txt} "
                            f"{row['pairs_per_s']:.0f} pairs/s")

                validated = step % val_every == 0 or step == total_steps
                if validated:
                    validate()
                if step == total_steps:
                    break
                if validated or step % train.checkpoint_every == 0:
                    save_checkpoint(done=False)
                t_last = time.perf_counter()

        wall_time, peak = elapsed(), max(peak_rss_mb(), peak_before)
        save_checkpoint(done=True, wall_time=wall_time, peak=peak)
        if main:
            metrics = _write_outputs(ckpt, stage, out_dir, reports_dir, history, val_history, best, step, steps_per_epoch,
                                     pairs_seen / max(train_time, 1e-9), wall_time, peak)
            tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
            tracker.log_artifact(out_dir / "model.safetensors", "model")
            tracker.log_artifact(reports_dir / "metrics.json", "reports")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        tracker.end(status)
        ddp_info.close()
    return metrics if main else {}


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


def _write_outputs(ckpt: Checkpointer, stage: str, out_dir: Path, reports_dir: Path, history: list[dict],
                   val_history: list[dict], best: dict, step: int, steps_per_epoch: int, pairs_per_s: float,
                   wall_time: float, peak_rss: float) -> dict[str, Any]:
    """``model.safetensors`` (best val weights), ``history.csv``, ``val_history.csv``, ``metrics.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        shutil.copyfile(ckpt.best_path, tmp)
    reports_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(reports_dir / "history.csv") as tmp:
        history_frame(history, stage).to_csv(tmp, index=False)
    with atomic_path(reports_dir / "val_history.csv") as tmp:
        pd.DataFrame(val_history).to_csv(tmp, index=False)
    final_val = val_history[-1]
    best_val = next(v for v in val_history if v["step"] == best["step"])
    last = history[-1]
    metrics: dict[str, Any] = {
        "steps": step,
        "epochs": step / steps_per_epoch,
        "best_step": best["step"],
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
