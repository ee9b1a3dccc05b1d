"""One experiment of a study, run the same way on any machine: the job runner.

A study that leaves one machine is a :class:`StudySpec`: its name, the commit every job
runs, the shared git remote (experiment refs), the shared DVC remote (outputs and the run
cache), the MLflow tracking URI and the planned experiments. The spec is published once
to the git remote as ``refs/dmp/studies/<name>``: a commit whose only file is
``study.json`` and whose parent is the study's commit, so fetching that one ref brings
both the plan and the code the jobs run.

A job (:func:`run_job`, ``dmp job run``) runs one planned experiment in its own clone:

1. ``git clone <git remote>``, fetch the study ref, check out the study's commit
   (detached); the DVC remote is set in ``.dvc/config.local`` (never committed);
2. copy the run cache's entries (``.dvc/cache/runs``, small YAML files) from the DVC
   remote, so that ``--pull`` can restore every stage that any earlier job finished;
3. the data stages (``dvc repro --pull targets`` with the experiment's params), pushed at
   once with the run cache, so that even a job killed outright (a lost node) leaves them
   for its resubmission. Only these are run-cacheable: pretrain and finetune keep resume
   checkpoints (``persist``) and evaluate writes git-tracked files, which DVC's run cache
   skips, so a job killed after pretraining trains again;
4. ``dvc exp run --pull -n <name> -S ...`` with ``MLFLOW_TRACKING_URI`` and ``DMP_STUDY``
   set (each stage's MLflow run is named ``<name>/<stage>`` and tagged with the study
   and the commit; only rank 0 logs);
5. success: ``dvc exp push --run-cache <git remote> <name>`` (the experiment's commit to
   the git remote, its outputs and run-cache entries to the DVC remote); failure: ``dvc
   push --run-cache``, so that a resubmitted job restores the stages this one finished.

:func:`warm_up` runs the data stages (``dvc repro targets``) once per distinct data
setting of the plan and pushes them with the run cache, before any fan-out, so that no
job recomputes them. Nothing here schedules: the DVC queue, Ray (:mod:`orchestration.cluster`),
SLURM or a shell loop decides where and when jobs run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dmp_core.errors import DmpError
from dmp_core.io import write_json
from orchestration.repo import echo, git

STUDY_REF = "refs/dmp/studies/{name}"
DATA_PREFIXES = ("data.", "targets.", "model.")  # with `seed`: what the stages up to `targets` read
DATA_STAGES_TARGET = "targets"


class JobFailed(DmpError):
    """A step of a job (clone, pull, run, push) failed; the message names it."""


@dataclass
class StudySpec:
    """A study that jobs on any machine can run: where everything goes, and the plan."""

    name: str
    commit: str
    git_remote: str
    dvc_remote: str
    tracking_uri: str
    experiments: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {dotted key: YAML value}

    def set_params(self, exp: str) -> list[str]:
        if exp not in self.experiments:
            raise JobFailed(f"study {self.name}: no experiment named {exp!r} (planned: {', '.join(self.experiments)})")
        return [f"++{key}={value}" for key, value in self.experiments[exp].items()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "StudySpec":
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise JobFailed(f"{where}: not a study spec ({str(err).splitlines()[0]})") from None


# ------------------------------------------------------------------ commands
def with_this_python(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's folder first on PATH: dvc.yaml runs ``python``, which
    must be this environment's wherever the job was started from."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def run_checked(cmd: Sequence[str], *, cwd: Optional[Path], what: str, env: Optional[dict] = None,
                log=None) -> subprocess.CompletedProcess:
    """Run ``cmd``; raise JobFailed naming ``what`` and the last line it printed. With ``log`` (a
    file) all its output goes there; without, stdout is returned and stderr kept apart."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env or with_this_python(dict(os.environ)), text=True,
                          stdout=log if log else subprocess.PIPE,
                          stderr=subprocess.STDOUT if log else subprocess.PIPE)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise JobFailed(f"{what}: `{' '.join(cmd)}` exited with {proc.returncode}"
                        + (f": {tail[-1]}" if tail else " (see the job log)"))
    return proc


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _git_ok(*args: str, cwd: Optional[Path] = None, what: str) -> str:
    proc = git(*args, cwd=cwd)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise JobFailed(f"{what}: `git {' '.join(args)}` failed: {last[-1] if last else proc.returncode}")
    return proc.stdout


# ------------------------------------------------------------------ the spec on the git remote
def publish_spec(spec: StudySpec, cwd: Optional[Path] = None) -> str:
    """Push ``study.json`` (parent: the study's commit) to ``refs/dmp/studies/<name>``; returns the ref.

    The same spec again is a no-op; another spec under a published name is refused."""
    ref = STUDY_REF.format(name=spec.name)
    if git("ls-remote", "--exit-code", spec.git_remote, ref, cwd=cwd).returncode == 0:
        published = fetch_spec(spec.git_remote, spec.name, Path(cwd or "."))
        if published == spec:
            return ref
        raise JobFailed(f"study {spec.name} is already published on {spec.git_remote} with another plan or commit "
                        f"({published.commit[:12]}, {len(published.experiments)} experiments): choose another --name")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
        tmp.write(spec.to_json())
    try:
        blob = _git_ok("hash-object", "-w", tmp.name, cwd=cwd, what="study spec").strip()
    finally:
        os.unlink(tmp.name)
    tree = subprocess.run(["git", "mktree"], input=f"100644 blob {blob}\tstudy.json\n", cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()
    commit = _git_ok("commit-tree", tree, "-p", spec.commit, "-m", f"dmp study {spec.name}", cwd=cwd,
                     what="study spec").strip()
    _git_ok("push", spec.git_remote, f"{commit}:{ref}", cwd=cwd,
            what=f"publishing study {spec.name} to {spec.git_remote}")
    return ref


def fetch_spec(git_remote: str, name: str, cwd: Path) -> StudySpec:
    """The study's spec from the git remote (also fetches the study's commit into ``cwd``)."""
    ref = STUDY_REF.format(name=name)
    _git_ok("fetch", "--quiet", git_remote, f"+{ref}:{ref}", cwd=cwd,
            what=f"study {name}: {ref} on {git_remote} (was the study published?)")
    return StudySpec.from_json(_git_ok("show", f"{ref}:study.json", cwd=cwd, what="study spec"), f"{git_remote} {ref}")


def read_spec(git_remote: str, name: str, work: Path) -> StudySpec:
    """The study's spec, read through a scratch repository of this call's own under ``work``.

    Jobs of one study start at once on one machine with the same ``--workdir``: a shared
    scratch repository would race on ``git init`` and on the fetched ref's lock."""
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spec-", dir=work) as scratch:
        _git_ok("init", "--quiet", "--bare", scratch, what=f"a scratch repository under {work}")
        return fetch_spec(git_remote, name, Path(scratch))


# ------------------------------------------------------------------ a clone at the study's commit
def clone_at(spec: StudySpec, folder: Path) -> Path:
    """A fresh clone of the git remote at the study's commit, its DVC remote set locally."""
    if folder.exists():  # an earlier try of this job here: what it finished is in the run cache
        echo(f"job: removing the earlier clone {folder} (a resubmission starts from a fresh clone)")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _git_ok("clone", "--quiet", "--no-checkout", spec.git_remote, str(folder), what=f"cloning {spec.git_remote}")
    fetch_spec(spec.git_remote, spec.name, folder)
    _git_ok("checkout", "--quiet", "--detach", spec.commit, cwd=folder, what=f"checking out {spec.commit}")
    run_checked(_dvc("remote", "add", "--local", "--force", "--default", "study", spec.dvc_remote), cwd=folder,
           what="setting the DVC remote")
    return folder


def pull_run_cache(folder: Path) -> int:
    """Copy the run cache's entries (not their outputs) from the default remote; returns how many.

    ``dvc pull --run-cache`` would also download every output those entries name (every
    model of the study); ``dvc exp run --pull`` then fetches only what it restores."""
    from dvc.repo import Repo

    with Repo(str(folder)) as repo:
        return len(repo.stage_cache.pull(None) or [])


def job_env(spec: StudySpec) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("DVC_EXP_NAME", "DVC_ROOT", "DVC_EXP_BASELINE_REV"):  # never inherit an outer experiment's
        env.pop(key, None)
    return with_this_python(env) | {"MLFLOW_TRACKING_URI": spec.tracking_uri, "DMP_STUDY": spec.name}


@dataclass
class JobResult:
    name: str
    ok: bool
    log: Path
    seconds: dict[str, float] = field(default_factory=dict)  # clone, pull_run_cache, run, push
    error: str = ""


def run_job(spec: StudySpec, exp: str, workdir: Path, *, keep: bool = False) -> JobResult:
    """Run experiment ``exp`` of ``spec`` in a fresh clone under ``workdir`` and push it.

    The clone is ``workdir/<study>/<exp>``; its log (every command's output) is
    ``workdir/<study>/<exp>.log``. The clone is removed after a success unless ``keep``."""
    set_params = spec.set_params(exp)
    folder = Path(workdir).resolve() / spec.name / exp
    log_path = folder.with_suffix(".log")
    folder.parent.mkdir(parents=True, exist_ok=True)
    result = JobResult(exp, False, log_path)
    env = job_env(spec)
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        result.seconds[step] = round(now - t, 2)
        t = now

    with open(log_path, "a") as log:  # a resubmission on the same machine appends
        def say(msg: str) -> None:
            echo(f"job {exp}: {msg}")
            log.write(f"# dmp job: {msg}\n")
            log.flush()

        try:
            say(f"study {spec.name}, commit {spec.commit[:12]}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, host {os.uname().nodename}")
            clone_at(spec, folder)
            lap("clone")
            say(f"{pull_run_cache(folder)} run-cache entries copied from the DVC remote")
            lap("pull_run_cache")
            say("data stages: restored from the run cache where an earlier job finished them, "
                "then pushed with the run cache")
            log.flush()
            data_stages(folder, set_params, log, env)
            lap("data_stages")
            run = ["exp", "run", "--pull", "-n", exp] + [a for s in set_params for a in ("-S", s)]
            say("dvc " + " ".join(run))
            log.flush()
            run_checked(_dvc(*run), cwd=folder, env=env, what=f"job {exp}", log=log)
            lap("run")
            log.flush()
            run_checked(_dvc("exp", "push", "--run-cache", spec.git_remote, exp), cwd=folder, env=env,
                   what=f"job {exp}: pushing", log=log)
            lap("push")
            result.ok = True
            say(f"pushed to {spec.git_remote} and {spec.dvc_remote} ("
                + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()) + ")")
        except JobFailed as err:
            result.error = str(err)
            say(f"FAILED: {err}")
            if folder.is_dir() and (folder / ".dvc").is_dir():
                log.flush()
                pushed = subprocess.run(_dvc("push", "--run-cache"), cwd=folder, env=env, text=True,
                                        stdout=log, stderr=subprocess.STDOUT)
                say("run cache of the finished stages pushed for a resubmission" if pushed.returncode == 0 else
                    f"run cache pushed (some outputs of unfinished stages were missing: exit {pushed.returncode})")
    if result.ok and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    write_json(folder.parent / f"{exp}.json", asdict(result))
    return result


# ------------------------------------------------------------------ before the fan-out
def data_settings(spec: StudySpec) -> list[dict[str, str]]:
    """The distinct overrides of the keys the data stages read (one warm-up per entry)."""
    out: list[dict[str, str]] = []
    for overrides in spec.experiments.values():
        part = {k: v for k, v in overrides.items() if k == "seed" or k.startswith(DATA_PREFIXES)}
        if part not in out:
            out.append(part)
    return out


def data_stages(folder: Path, set_params: Sequence[str], log, env: Optional[dict] = None) -> None:
    """``dvc repro --pull targets`` with the experiment's params, then push those stages with
    the run cache: pushed before training starts, they survive a job that is killed outright."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(folder / "params.yaml", list(set_params))  # what `dvc exp run -S` writes
    run_checked(_dvc("repro", "--pull", DATA_STAGES_TARGET), cwd=folder, what="data stages", log=log, env=env)
    run_checked(_dvc("push", "--run-cache", DATA_STAGES_TARGET, "--with-deps"), cwd=folder,
           what="data stages: pushing", log=log, env=env)


def warm_up(spec: StudySpec, workdir: Path) -> None:
    """Run the data stages once per distinct data setting and push them with the run cache."""
    folder = clone_at(spec, Path(workdir).resolve() / spec.name / "_warm-up")
    params = folder / "params.yaml"
    original = params.read_bytes()
    with open(folder.with_suffix(".log"), "w") as log:
        pull_run_cache(folder)
        for i, part in enumerate(data_settings(spec), start=1):
            params.write_bytes(original)
            echo(f"study {spec.name}: warm-up {i}: data stages with "
                 + (", ".join(f"{k}={v}" for k, v in part.items()) or "the committed params"))
            data_stages(folder, [f"++{k}={v}" for k, v in part.items()], log)
    shutil.rmtree(folder, ignore_errors=True)
