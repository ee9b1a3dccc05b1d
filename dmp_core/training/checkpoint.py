"""Checkpoints: atomic safetensors weights + resume state, and refusal of mismatches.

Layout of ``<out_dir>/checkpoints/`` (a DVC output with ``persist: true``)::

    step_000040.safetensors   full training module state (model, EMA, loss modules)
    step_000040.pt            optimiser, scheduler, RNG of every rank, data position,
                              best val metric, history rows (torch.save, tensors + plain types)
    best.safetensors          DMPModel weights at the best val check so far
    latest.json               the commit record: which step files are current, the
                              fingerprint, the MLflow run id, ``done``

Every file is written to a temporary name and renamed (``dmp_core.io.atomic_path``);
``latest.json`` is written last, so a process killed at any instant leaves either the
previous complete checkpoint or the new one, never a half-written one. Older step files
are deleted once ``latest.json`` points past them.

A checkpoint records a *fingerprint* (stage, model preset, variant, training-set size,
world size) and the flattened parameters that determine the run. Resuming an unfinished
checkpoint whose fingerprint or parameters differ raises :class:`CheckpointError` naming
the first differing key; a finished (``done``) checkpoint with other parameters is set
aside and training starts from scratch (this is what ``dvc exp run -S ...`` needs,
since the persisted folder of the baseline run is present in the experiment's workspace).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from dmp_core.config import Config, flatten
from dmp_core.errors import CheckpointError
from dmp_core.io import atomic_path, write_json

FORMAT_VERSION = 1
LATEST = "latest.json"
BEST = "best.safetensors"

# training-section keys that do not change what is computed (only how often it is reported)
_NEUTRAL_TRAIN_KEYS = {"num_workers", "checkpoint_every", "log_every"}


def run_params(cfg: Config, stage: str) -> dict[str, Any]:
    """The flattened parameters that determine a stage's result (the resume contract).

    Leaves out what only changes where data lives or how often progress is reported."""
    sections = ("seed", "data", "targets", "model", "objective", stage)
    flat = flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k in sections})
    neutral = {"data.root"} | {f"{stage}.{key}" for key in _NEUTRAL_TRAIN_KEYS}
    return {k: v for k, v in flat.items() if k not in neutral}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_fingerprint(cfg: Config, stage: str, *, n_train: int, world_size: int,
                     init_weights: Optional[str | Path] = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (besides :func:`run_params`)."""
    return {
        "format": FORMAT_VERSION,
        "stage": stage,
        "preset": cfg.model.preset,
        "variant": cfg.objective.variant,
        "n_train": int(n_train),
        "world_size": int(world_size),
        "init_weights_sha256": file_sha256(init_weights) if init_weights else None,
    }


@dataclass
class Resume:
    """What :meth:`Checkpointer.load` hands back to the training loop."""

    step: int
    done: bool
    run_id: Optional[str]
    state: dict[str, Any]  # the torch.save'd resume state
    weights: Path
    best_step: Optional[int] = None
    meta: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Writes and reads the checkpoints of one stage run in ``folder``."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], params: dict[str, Any]):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.params = params

    # ------------------------------------------------------------------ paths
    @property
    def latest_path(self) -> Path:
        return self.folder / LATEST

    @property
    def best_path(self) -> Path:
        return self.folder / BEST

    def last_checkpoint_name(self) -> str:
        """For error messages: the last complete checkpoint, or 'none'."""
        meta = self._read_meta(missing_ok=True)
        return f"{self.latest_path} (step {meta['step']})" if meta else "none"

    # ------------------------------------------------------------------ write
    def save_best(self, model: torch.nn.Module) -> None:
        with atomic_path(self.best_path) as tmp:
            save_model(model, str(tmp))

    def save(self, module: torch.nn.Module, state: dict[str, Any], *, step: int, done: bool,
             run_id: Optional[str], best_step: Optional[int]) -> Path:
        """Write step files, then commit them in ``latest.json``; prune older steps."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:07d}"
        weights, state_file = self.folder / f"{stem}.safetensors", self.folder / f"{stem}.pt"
        with atomic_path(weights) as tmp:
            save_model(module, str(tmp), metadata={"step": str(step), "stage": self.fingerprint["stage"]})
        with atomic_path(state_file) as tmp:
            torch.save(state, tmp)
        write_json(self.latest_path, {
            "step": step,
            "done": done,
            "weights": weights.name,
            "state": state_file.name,
            "best": BEST if best_step is not None else None,
            "best_step": best_step,
            "run_id": run_id,
            "fingerprint": self.fingerprint,
            "params": self.params,
        })
        for old in self.folder.glob("step_*"):
            if old.name not in (weights.name, state_file.name):
                old.unlink(missing_ok=True)
        return self.latest_path

    # ------------------------------------------------------------------ read
    def _read_meta(self, missing_ok: bool = False) -> Optional[dict[str, Any]]:
        if not self.latest_path.is_file():
            return None
        try:
            meta = json.loads(self.latest_path.read_text())
            for key in ("step", "done", "weights", "state", "fingerprint", "params"):
                meta[key]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            if missing_ok:
                return None
            raise CheckpointError(f"{self.latest_path}: corrupt checkpoint record ({type(err).__name__}); "
                                  f"delete {self.folder} to start over") from None
        return meta

    def mismatch(self, meta: dict[str, Any]) -> Optional[str]:
        """The first difference between a stored checkpoint and this run, as one phrase."""
        for key, mine in self.fingerprint.items():
            theirs = meta["fingerprint"].get(key)
            if theirs != mine:
                return f"{key}={theirs!r} in the checkpoint, {mine!r} now"
        stored = meta["params"]
        for key in sorted(set(stored) | set(self.params)):
            theirs, mine = stored.get(key, "<absent>"), self.params.get(key, "<absent>")
            if theirs != mine:
                return f"{key}={theirs!r} in the checkpoint, {mine!r} now"
        return None

    def load(self, module: torch.nn.Module) -> Optional[Resume]:
        """Restore ``module`` from the last checkpoint and return its state, or None to
        start fresh. Raises CheckpointError on a corrupt or mismatched unfinished one."""
        meta = self._read_meta()
        if meta is None:
            self._clear()  # stray step files from a run killed before its first commit
            return None
        diff = self.mismatch(meta)
        if diff is not None:
            if meta["done"]:
                # a finished run under other params: retrain from scratch
                self._clear()
                return None
            raise CheckpointError(f"{self.latest_path}: checkpoint does not match this run ({diff}); "
                                  f"delete {self.folder} to start over")
        weights = self.folder / meta["weights"]
        state_file = self.folder / meta["state"]
        try:
            load_model(module, weights, strict=True)
        except (SafetensorError, RuntimeError, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{weights}: corrupt or incompatible checkpoint weights ({first})") from None
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises a variety of pickle/zip errors
            raise CheckpointError(f"{state_file}: corrupt checkpoint state ({type(err).__name__})") from None
        if meta.get("best") and not self.best_path.is_file():
            raise CheckpointError(f"{self.best_path}: missing (latest.json refers to it)")
        return Resume(step=int(meta["step"]), done=bool(meta["done"]), run_id=meta.get("run_id"), state=state,
                      weights=weights, best_step=meta.get("best_step"), meta=meta)

    def _clear(self) -> None:
        # every DDP rank may get here at once: whoever comes second finds less to delete
        shutil.rmtree(self.folder, ignore_errors=True)
