"""Studies beyond one machine: publish, warm up, fan out on Ray, collect.

``dmp study <kind> --engine ray`` (:func:`run_on_ray`):

1. the study's commit must be HEAD with no uncommitted change and must be on the git
   remote's branches or is pushed with the study ref (:func:`orchestration.jobs.publish_spec`);
2. the MLflow experiment is created once, up front (concurrent creation races: mlflow
   issue 10334), and a SQLite store is refused: many writers need ``mlflow server``;
3. :func:`orchestration.jobs.warm_up` runs the data stages once and pushes them;
4. one Ray task per experiment (``num_gpus`` each: Ray sets ``CUDA_VISIBLE_DEVICES``),
   each running the job runner ``dmp job run`` as a subprocess, so a task is exactly
   what a SLURM script or a shell loop would run;
5. :func:`collect` writes the report.

``dmp study collect <name>`` (:func:`collect`) works in any clone at the study's commit:
it reads the plan from the git remote, pulls the experiments that exist there (``dvc exp
pull --no-cache``: the report reads the git-tracked results), names the missing ones (a
job that failed or has not finished pushes nothing) and writes the report.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dmp_core.errors import DmpError
from orchestration.jobs import StudySpec, fetch_spec, publish_spec, run_checked, warm_up
from orchestration.repo import echo, git, git_status


class ClusterError(DmpError):
    """A study cannot go to the cluster as asked (one line saying what to change)."""


@dataclass
class ClusterSettings:
    """Where a study runs and where its results go (options or environment, never code)."""

    engine: str = "queue"                 # queue (local DVC queue) | ray | jobs (printed job lines)
    gpus: list[str] = field(default_factory=list)  # queue: one worker per listed GPU id
    gpus_per_exp: float = 0.0             # GPUs per experiment (ray: num_gpus; > 1: torchrun with that many)
    address: Optional[str] = None         # ray: cluster address; None starts a local one
    local_gpus: Optional[int] = None      # ray: GPU slots of a local cluster (fake ones for tests)
    git_remote: Optional[str] = None      # shared git remote (URL or path)
    dvc_remote: Optional[str] = None      # shared DVC remote (URL or path)
    tracking_uri: Optional[str] = None    # MLflow tracking URI for every job
    workdir: Path = Path(".dvc/tmp/jobs")  # where each job clones (per machine)
    name: Optional[str] = None            # study name (default: <kind>-<short commit>)
    warm_up: bool = True


def _require(value: Optional[str], option: str) -> str:
    if not value:
        raise ClusterError(f"{option} is required with --engine ray or jobs (or set its environment variable)")
    return value


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


def study_spec(kind: str, plan: Sequence, settings: ClusterSettings) -> StudySpec:
    """The spec of a study at HEAD; refuses uncommitted changes and a SQLite tracking store."""
    changed = [path for code, path in git_status() if code != "??"]
    if changed:
        raise ClusterError(f"uncommitted changes ({', '.join(changed[:5])}): jobs on other machines run a commit; "
                           "commit them first")
    commit = git("rev-parse", "HEAD").stdout.strip()
    uri = _require(settings.tracking_uri, "--tracking-uri")
    if is_sqlite(uri):
        raise ClusterError(f"--tracking-uri {uri}: jobs on several machines cannot share a SQLite file; start "
                           "`mlflow server` with a database backend and pass its http:// URI (docs/CLUSTER.md)")
    return StudySpec(name=settings.name or f"{kind}-{commit[:7]}", commit=commit,
                     git_remote=_require(settings.git_remote, "--git-remote"),
                     dvc_remote=_require(settings.dvc_remote, "--dvc-remote"), tracking_uri=uri,
                     experiments={exp.name: dict(exp.overrides) for exp in plan})


def ensure_experiment(uri: str, name: str) -> str:
    """Create the MLflow experiment once, before any job starts; returns its id."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp else client.create_experiment(name)
    except Exception as err:  # noqa: BLE001  (unreachable server, refused connection, ...): one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ClusterError(f"--tracking-uri {uri}: cannot create the MLflow experiment {name!r} ({first})") from None


def job_command(spec: StudySpec, exp: str, workdir: Path) -> list[str]:
    """The job runner's command line: what a Ray task, an sbatch script or a shell loop runs."""
    return [sys.executable, "-m", "stages", "job", "run", spec.name, exp, "--git-remote", spec.git_remote,
            "--workdir", str(Path(workdir).resolve())]


def run_on_ray(spec: StudySpec, names: Sequence[str], settings: ClusterSettings) -> dict[str, int]:
    """One Ray task per experiment of a published study; returns each job's exit status."""
    import ray

    if settings.address:
        ray.init(address=settings.address, log_to_driver=True)
    else:
        ray.init(num_gpus=settings.local_gpus, include_dashboard=False, log_to_driver=True)

    nproc = {"DMP_NPROC_PER_NODE": str(int(settings.gpus_per_exp))} if settings.gpus_per_exp > 1 else {}

    @ray.remote(num_gpus=settings.gpus_per_exp, num_cpus=1, max_retries=0)
    def job(cmd: list[str]) -> int:  # Ray has set CUDA_VISIBLE_DEVICES to this task's GPUs
        return subprocess.run(cmd, env={**os.environ, **nproc}).returncode

    try:
        futures = {name: job.remote(job_command(spec, name, settings.workdir)) for name in names}
        echo(f"study {spec.name}: {len(futures)} Ray tasks submitted ({settings.gpus_per_exp:g} GPU each)")
        return {name: ray.get(future) for name, future in futures.items()}
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ collect
def remote_experiments(git_remote: str, commit: str) -> set[str]:
    """Names of the DVC experiments of ``commit`` on the git remote."""
    proc = run_checked([sys.executable, "-m", "dvc", "exp", "list", "--name-only", "--rev", commit, git_remote],
                       cwd=None, what="study: listing the remote's experiments")
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def collect(name: str, git_remote: str, cwd: Optional[Path] = None) -> tuple[StudySpec, list[str], list[str]]:
    """Pull the study's experiments into this clone; returns (spec, pulled, missing)."""
    spec = fetch_spec(git_remote, name, Path(cwd or "."))
    head = git("rev-parse", "HEAD", cwd=cwd).stdout.strip()
    if head != spec.commit:
        raise ClusterError(f"study {name} ran at commit {spec.commit[:12]}, this clone is at {head[:12] or '(none)'}: "
                           f"`git checkout {spec.commit[:12]}` first (the report compares the experiments of HEAD)")
    found = remote_experiments(git_remote, spec.commit)
    pulled = [exp for exp in spec.experiments if exp in found]
    missing = [exp for exp in spec.experiments if exp not in found]
    if pulled:
        run_checked([sys.executable, "-m", "dvc", "exp", "pull", "--no-cache", "--force", git_remote, *pulled],
                    cwd=cwd, what="collect")
    echo(f"study {name}: {len(pulled)} of {len(spec.experiments)} experiments pulled from {git_remote}"
         + (f"; missing (failed or not finished): {', '.join(missing)}" if missing else ""))
    return spec, pulled, missing


def partial_note(spec: StudySpec, missing: Sequence[str]) -> list[str]:
    if not missing:
        return [f"Study {spec.name} (commit {spec.commit[:12]}): all {len(spec.experiments)} experiments collected."]
    return [f"Study {spec.name} is PARTIAL: {len(missing)} of {len(spec.experiments)} planned experiments are not on "
            f"{spec.git_remote} (failed or not finished): {', '.join(missing)}. Resubmit one with "
            f"`dmp job run {spec.name} <name> --git-remote {spec.git_remote}`."]


def collect_and_report(name: str, git_remote: str, params: Path) -> list[str]:
    """:func:`collect`, then the report over this clone's experiments; returns the missing names."""
    from dmp_core.config import load_config
    from orchestration.runs import write_report

    spec, _, missing = collect(name, git_remote)
    write_report(load_config(params), params_path=params, notes=tuple(partial_note(spec, missing)))
    return missing


ENGINES = ("queue", "ray", "jobs")


def run_remote(plan: Sequence, kind: str, settings: ClusterSettings, params: Path, *, dry_run: bool = False,
               rerun: bool = False) -> int:
    """A study on remotes shared by many machines (``--engine ray`` or ``jobs``).

    ``ray``: publish, warm up, one Ray task per experiment, collect and report (exit 1
    when a job failed). ``jobs``: publish, warm up and print one ``dmp job run`` line per
    experiment, for sbatch, submitit or a shell loop; ``dmp study collect`` reports later."""
    if settings.engine not in ENGINES:
        raise ClusterError(f"--engine {settings.engine!r}: not one of {', '.join(ENGINES)}")
    spec = study_spec(kind, plan, settings)
    existing = set() if rerun or dry_run else remote_experiments(spec.git_remote, spec.commit)
    names = [name for name in spec.experiments if name not in existing]
    for name in spec.experiments:
        if name in existing:
            echo(f"study {spec.name}: {name} is on {spec.git_remote} already: kept (--rerun runs it again)")
    if not dry_run:  # before any job starts: the plan on the remote, the MLflow experiment, the data stages
        publish_spec(spec)
        echo(f"study {spec.name}: published as refs/dmp/studies/{spec.name} on {spec.git_remote}")
        ensure_experiment(spec.tracking_uri, experiment_name_of(params))
        if settings.warm_up:
            warm_up(spec, settings.workdir)
    if dry_run or settings.engine == "jobs":
        print(f"# study {spec.name} at {spec.commit[:12]}: one job per line, on any machine (docs/CLUSTER.md)")
        for name in names:
            print("dmp " + shlex.join(job_command(spec, name, settings.workdir)[3:]))
        print(f"dmp study collect {spec.name} --git-remote {spec.git_remote}")
        return 0
    codes = run_on_ray(spec, names, settings)
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        echo(f"study {spec.name}: {len(failed)} jobs failed ({', '.join(failed)}): their logs are in "
             f"{settings.workdir}/{spec.name}/<name>.log on the machine that ran them")
    collect_and_report(spec.name, spec.git_remote, params)
    return 1 if failed else 0


def experiment_name_of(params: Path) -> str:
    from dmp_core.config import load_config
    from dmp_core.tracking import experiment_name

    return experiment_name(load_config(params))
