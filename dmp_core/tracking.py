"""MLflow tracking: where runs go, and one run per stage invocation.

Tracking URI, in order: ``tracking.uri`` from params.yaml, ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<project root>/mlflow.db`` (absolute). The project root is ``$DVC_ROOT``, else
the git top level, else the working directory. A queued or ``--temp`` DVC experiment runs
in a throw-away copy under ``<real root>/.dvc/tmp/exps/`` (``.../exps/tmpXXXX`` for
queued runs, ``.../exps/standalone/tmpXXXX`` for ``--temp``; DVC 3.67 sets ``DVC_ROOT``
to the real root there, checked on this machine): any path inside that copy is mapped
back to the real root, so queued runs land in the user's store rather than in a copy
that DVC deletes afterwards. Artifacts of a SQLite store go to ``mlartifacts/`` beside
the database file (set explicitly as the experiment's ``file://`` artifact location).

Each run is named ``<DVC experiment name or 'workspace'>/<stage>``; its params are every
config key with its real value (``null``, ``true``) plus ``resolved.<name>``, the objectives
the variant recipe and the switches resolve to; tags ``dmp.objectives`` and
``dmp.mim_target`` make runs filterable by what actually ran (see :func:`mlflow_params`,
:func:`objective_tags`). :func:`close_orphan_run` ends a run killed before its first
checkpoint.

Only rank 0 tracks; other ranks get a :class:`NullTracker`.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from dmp_core.config import Config, TrackingParams, flatten
from dmp_core.errors import DmpError
from dmp_core.io import write_json

DVC_EXPS_MARKER = "/.dvc/tmp/exps/"


class TrackingError(DmpError):
    """The MLflow store cannot be opened or written (one line naming the URI)."""


# ---------------------------------------------------------------- where runs go
def _outside_dvc_exp_copy(path: Path) -> Path:
    """``<root>/.dvc/tmp/exps/<...>`` -> ``<root>``; any other path unchanged."""
    text = str(path)
    if DVC_EXPS_MARKER in text + "/":
        return Path((text + "/").split(DVC_EXPS_MARKER, 1)[0])
    return path


def _git_toplevel(cwd: Path) -> Optional[Path]:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.stdout.strip() else None


def project_root(cwd: str | Path | None = None) -> Path:
    """The user's real project root, also from inside a DVC experiment's temporary copy."""
    cwd = Path(cwd or os.getcwd()).resolve()
    if os.environ.get("DVC_ROOT"):
        return _outside_dvc_exp_copy(Path(os.environ["DVC_ROOT"]).resolve())
    inside = _outside_dvc_exp_copy(cwd)
    if inside != cwd:
        return inside
    return _outside_dvc_exp_copy(_git_toplevel(cwd) or cwd)


def resolve_tracking_uri(tracking: TrackingParams | Config, cwd: str | Path | None = None) -> str:
    """The absolute tracking URI for this invocation (see the module docstring).

    Takes the ``tracking`` section or the whole config."""
    if isinstance(tracking, Config):
        tracking = tracking.tracking
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # a relative SQLite path would land in a DVC experiment's temporary copy
            rel = uri[len("sqlite:///"):]
            return f"sqlite:///{project_root(cwd) / rel}"
        return uri
    return f"sqlite:///{project_root(cwd) / 'mlflow.db'}"


def artifact_location_for(uri: str) -> Optional[str]:
    """``file://<db folder>/mlartifacts`` for a SQLite store; None lets a server decide."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"dmp-{cfg.data.name}"


def git_commit(cwd: str | Path | None = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or os.getcwd(), capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_run_json(path: str | Path) -> Optional[dict[str, Any]]:
    """``reports/<stage>/run.json`` of an upstream stage, or None if absent/unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- what a run records
# the objectives the finetune stage trains, whatever the variant (dmp_core.training.meta_arch
# LOSS_TERMS["finetune"]; tests/test_tracking.py checks that the two agree)
FINETUNE_OBJECTIVES = ("itc", "itm")
MLFLOW_PARAM_MAX = 6000  # MLflow's limit on the length of a param value


def param_value(value: Any) -> str:
    """A param as MLflow stores it (a string), spelt as in params.yaml: ``null``, ``true``,
    ``0.0005``, ``["hog", "pixel"]``; never ``''`` for an unset switch."""
    if isinstance(value, str):
        text = value
    else:  # None -> null, True -> true, lists and tuples -> JSON arrays, numbers as Python prints them
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    return text[:MLFLOW_PARAM_MAX]


def mlflow_params(cfg: Config) -> dict[str, str]:
    """Every config key (its real value) plus ``resolved.<name>``: what the variant recipe
    and the switches give (``cfg.objective.resolve()``: which objectives ran, the MIM target,
    the mask ratios, ITM's negatives, whether an EMA model exists). The resolved objectives
    are those of pretraining, the recipe behind both stages' models."""
    resolved = cfg.objective.resolve()
    params = {k: param_value(v) for k, v in flatten(cfg).items()}
    params.update({f"resolved.{k}": param_value(v) for k, v in resolved.model_dump().items()})
    params["resolved.objectives"] = ",".join(resolved.active)
    return params


def objective_tags(cfg: Config, stage: str) -> dict[str, str]:
    """Tags to filter runs by: ``dmp.objectives`` (what this stage trains, e.g.
    ``itc,itm,mlm,mim,vicreg``), ``dmp.pretrain_objectives`` and ``dmp.mim_target``
    (``hog`` / ``pixel`` / ``momentum``, or ``none`` when MIM is off)."""
    resolved = cfg.objective.resolve()
    active = ",".join(resolved.active)
    return {
        "dmp.objectives": ",".join(FINETUNE_OBJECTIVES) if stage == "finetune" else active,
        "dmp.pretrain_objectives": active,
        "dmp.mim_target": resolved.mim_target if resolved.mim else "none",
    }


def run_name(stage: str) -> str:
    """``<DVC experiment name or 'workspace'>/<stage>``, e.g. ``mamo-default/pretrain``."""
    return f"{os.environ.get('DVC_EXP_NAME') or 'workspace'}/{stage}"


def close_orphan_run(run_json_path: str | Path, cfg: Config) -> Optional[str]:
    """End the MLflow run of a stage killed before its first checkpoint.

    Call it when a stage starts fresh (no resumable checkpoint). When ``run_json_path``
    (a ``run.json`` written when that earlier run started) names a run that MLflow still
    shows as RUNNING, nothing will ever end it: it is marked KILLED, and a one-line
    message for the log is returned. Otherwise (no file, no such run, already ended,
    store unreachable) returns None: a bookkeeping problem must not stop training."""
    info = read_run_json(run_json_path) or {}
    run_id = info.get("run_id")
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = info.get("tracking_uri") or resolve_tracking_uri(cfg.tracking)
    try:
        client = MlflowClient(uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, status="KILLED")
    except (MlflowException, OSError):
        return None
    return f"previous run {run_id} was killed before its first checkpoint: marked KILLED; starting from step 0"


# ---------------------------------------------------------------- the run
class NullTracker:
    """What ranks other than 0 (and runs without tracking) get: every call does nothing."""

    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    uri: Optional[str] = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def run_info(self) -> dict[str, Any]:
        return {}


class Tracker(NullTracker):
    """One MLflow run for one stage invocation (continued when ``run_id`` is given).

    Metrics are buffered and sent with ``log_batch`` on :meth:`flush` (the loop flushes
    every ``log_every`` steps), so per-step logging costs no round trip per step."""

    def __init__(self, cfg: Config, stage: str, *, run_id: Optional[str] = None,
                 upstream_run_id: Optional[str] = None, cwd: str | Path | None = None):
        from mlflow.exceptions import MlflowException

        self.uri = resolve_tracking_uri(cfg.tracking, cwd)
        try:
            self._start(cfg, stage, run_id, upstream_run_id, cwd)
        except (MlflowException, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise TrackingError(f"tracking.uri={self.uri}: cannot start an MLflow run ({first})") from None

    def _start(self, cfg: Config, stage: str, run_id: Optional[str], upstream_run_id: Optional[str],
               cwd: str | Path | None) -> None:
        import mlflow  # imported here: it takes seconds, and ranks > 0 never need it
        from mlflow.exceptions import MlflowException

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        self.experiment_id = self._experiment(experiment_name(cfg))
        self._buffer: list = []

        tags = {
            "dmp.stage": stage,
            "dmp.variant": cfg.objective.variant,
            "dmp.model_preset": cfg.model.preset,
            "dmp.data": cfg.data.name,
            **objective_tags(cfg, stage),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "dmp.study": os.environ.get("DMP_STUDY", ""),  # set by the job runner (orchestration/jobs.py)
            "dmp.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "mlflow.source.git.commit": git_commit(cwd) or "",
            "dmp.upstream_run_id": upstream_run_id or "",
        }
        resumed = False
        if run_id:
            try:
                if self.client.get_run(run_id).info.experiment_id == self.experiment_id:
                    resumed = True
            except MlflowException:
                resumed = False
        self.run = mlflow.start_run(
            run_id=run_id if resumed else None,
            experiment_id=None if resumed else self.experiment_id,
            run_name=None if resumed else run_name(stage),
            log_system_metrics=cfg.tracking.system_metrics,
        )
        self.run_id = self.run.info.run_id
        self.resumed = resumed
        mlflow.set_tags({k: v for k, v in tags.items() if v})
        if not resumed:  # params are write-once per run
            mlflow.log_params(mlflow_params(cfg))
            mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/params.yaml")

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location_for(self.uri))
        except MlflowException:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())

    def flush(self) -> None:
        while self._buffer:  # log_batch accepts at most 1000 metrics per call
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._mlflow.end_run(status=status)

    def run_info(self) -> dict[str, Any]:
        """How to find this run, and where it ran (kept in the resume state, so a resumed or
        re-finished stage writes the same ``run.json``)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri,
                "environment": launch_environment()}


def launch_environment() -> dict[str, str]:
    """Where a stage ran: the host, the GPUs it was given (a queue worker's or Ray's pin), the study."""
    return {"host": os.uname().nodename, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
            "study": os.environ.get("DMP_STUDY", "")}


def write_run_json(reports_dir: str | Path, tracker: NullTracker, **extra: Any) -> None:
    """``reports/<stage>/run.json``: how to find this stage's MLflow run, and where it ran."""
    write_json(Path(reports_dir) / "run.json", {**tracker.run_info(), **extra})
