"""Studies (``dmp study seeds|ablations|scaling``): plan DVC experiments, queue and run them, report.

Each study plans one ``dvc exp run --queue --name <name> -S ++key=value ...`` per
(setting, seed), checks every planned experiment's params against the schema before
queueing anything (with DVC's own ``-S`` writer, so what is checked is what will run),
skips experiments that are finished already, starts the queue with ``dvc queue start -j J``,
polls ``dvc queue status`` until every queued experiment has finished, then writes the
report (``dmp report``). ``--dry-run`` prints the commands as a shell script and runs nothing.

Finished already means: an experiment of that name exists for this commit, or a run
exported to the study's runs folder (``--runs``, default ``reports/runs``) has the same
method params and seed under any name (:func:`skip_finished`); ``--rerun`` runs them all
again. Each experiment that finishes successfully is exported to that folder at once
(:func:`orchestration.export.export_experiment`), so a study that spans sessions and clones
goes on from its committed exports: commit them, pull in the other clone, run the same command.
Before queueing, the study records its plan in ``<runs>/plan.json`` (:func:`write_plan`), so
that the report names the planned runs that have not run yet; it is committed with the exports.

Overrides always use ``++key=value``: DVC then sets the key whether or not the lean
params.yaml lists it (a plain ``key=value`` fails for an absent key); a misspelt key
is still refused, by the plan check here and by the pipeline's ``params`` stage.

Data scaling has two axes (``--axis``): ``pretrain`` (the default, the seed paper's axis)
sets ``pretrain.data_fraction``, the nested share of the training images that pretraining
sees while finetuning sees them all (``pts-<variant>-f<NNN>-s<seed>``); ``data`` sets
``data.fraction``, the share the whole pipeline trains on (``scale-<variant>-f<NNN>-s<seed>``).
Either measures data, not compute: by default (``--budget steps``) every fraction trains
the same number of optimiser steps (``pretrain.steps``/``finetune.steps`` set, epochs null),
so a smaller fraction repeats its images more often. ``--budget epochs`` trains the same
number of epochs instead (steps null), so fraction f also gets f times the compute of the
full set; the experiment names say which (``-ep<E>``).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from dmp_core.config import Config, ParamsError, load_config, nested_count
from dmp_core.errors import DmpError
from orchestration.cluster import ClusterSettings, is_sqlite, run_remote
from orchestration.export import FinishedRun, export_experiment, finished_runs, head_sha
from orchestration.repo import echo, params_differ_from_head, untracked_sources
from orchestration.runs import PLAN, plan_entries

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
VARIANTS = ("mamo", "denoising")  # the default pair; --variants may add frozen (the LiT baseline)
KNOWN_VARIANTS = ("mamo", "denoising", "frozen")
FRACTIONS_TEXT, VARIANTS_TEXT = ",".join(f"{f:g}" for f in FRACTIONS), ",".join(VARIANTS)  # option defaults
TRAIN_STAGES = ("pretrain", "finetune")
# (name, overrides): the planned ablations; the denoising rows state the variant
# explicitly so they do not depend on the baseline's params.yaml
ABLATIONS: tuple[tuple[str, dict[str, str]], ...] = (
    ("mamo", {"objective.variant": "mamo"}),
    ("denoise-hog", {"objective.variant": "denoising"}),
    ("denoise-pixel", {"objective.variant": "denoising", "objective.mim_target": "pixel"}),
    ("denoise-no-vicreg", {"objective.variant": "denoising", "objective.vicreg": "false"}),
    ("denoise-no-itc", {"objective.variant": "denoising", "objective.itc": "false"}),
    ("denoise-text025", {"objective.variant": "denoising", "objective.text_mask_ratio": "0.25"}),
)
FINISHED = ("success", "failed", "killed", "stopped")
# DVC's queue workers can stop while tasks still wait (iterative/dvc 10562): started again this often
WORKER_RESTARTS = 3


class StudyFailed(DmpError):
    """A dvc command of the study failed (the message names it and its last line)."""
Budget = Literal["steps", "epochs"]
Axis = Literal["pretrain", "data"]
# --axis -> (experiment name prefix, the key the study varies)
AXES: dict[str, tuple[str, str]] = {"pretrain": ("pts", "pretrain.data_fraction"), "data": ("scale", "data.fraction")}


@dataclass
class PlannedExp:
    name: str
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> YAML value

    def set_params(self) -> list[str]:
        """The ``-S`` values: ``++`` sets a key whether or not params.yaml lists it."""
        return [f"++{key}={value}" for key, value in self.overrides.items()]

    def command(self) -> list[str]:
        cmd = ["dvc", "exp", "run", "--queue", "--name", self.name]
        for item in self.set_params():
            cmd += ["-S", item]
        return cmd


# ------------------------------------------------------------------ plans
def ablation_plan(seeds: int) -> list[PlannedExp]:
    return [PlannedExp(f"abl-{name}-s{seed}", {**overrides, "seed": str(seed)})
            for name, overrides in ABLATIONS for seed in range(seeds)]


def seeds_plan(seeds: int, variants: Sequence[str] = VARIANTS, first_seed: int = 0) -> list[PlannedExp]:
    """Each variant at the params.yaml settings with seeds ``first_seed..seeds-1``."""
    return [PlannedExp(f"seed-{variant}-s{seed}", {"objective.variant": variant, "seed": str(seed)})
            for variant in variants for seed in range(first_seed, seeds)]


def budget_overrides(budget: Budget, base: Config, epochs: int) -> dict[str, str]:
    """The training-length keys every scaling experiment sets, so that the policy holds
    whatever params.yaml says: equal steps (from params.yaml) or equal epochs."""
    out: dict[str, str] = {}
    for stage in TRAIN_STAGES:
        if budget == "steps":
            steps = getattr(base, stage).steps
            if steps is None:
                raise ParamsError(f"{stage}.steps: null in params.yaml (it sets {stage}.epochs), so an equal-steps "
                                  f"scaling study has no step count; set {stage}.steps or use --budget epochs")
            out |= {f"{stage}.steps": str(steps), f"{stage}.epochs": "null"}
        else:
            out |= {f"{stage}.steps": "null", f"{stage}.epochs": str(epochs)}
    return out


def scaling_plan(seeds: int, fractions: Sequence[float] = FRACTIONS, variants: Sequence[str] = VARIANTS, *,
                 budget: Budget = "steps", base: Optional[Config] = None, epochs: int = 1,
                 axis: Axis = "pretrain") -> list[PlannedExp]:
    """fraction x variant x seed, all with the same training budget (see the module doc).

    ``axis`` pretrain: ``pretrain.data_fraction`` (pretraining sees that nested share of the
    training images, finetuning all of them; ``pts-...``); data: ``data.fraction`` (the
    whole pipeline on the share; ``scale-...``)."""
    lengths = budget_overrides(budget, base or Config(), epochs)
    tag = "" if budget == "steps" else f"-ep{epochs}"
    prefix, key = AXES[axis]
    return [PlannedExp(f"{prefix}-{variant}-f{round(fraction * 100):03d}{tag}-s{seed}",
                       {"objective.variant": variant, key: f"{fraction:g}", **lengths, "seed": str(seed)})
            for variant in variants for fraction in fractions for seed in range(seeds)]


def training_images(cfg: Config) -> Optional[int]:
    """Training images at ``cfg.data.fraction`` (synthetic: from the params; else None)."""
    if cfg.data.name != "synthetic":
        return None
    return nested_count(cfg.data.synthetic.n_train, cfg.data.fraction)


def budget_lines(budget: Budget, configs: Sequence[Config], *, axis: Axis = "pretrain") -> list[str]:
    """The policy in words (the budget, which stage sees the fraction) and, per fraction, the
    training images each stage sees and the steps and epochs it trains."""
    key, other = AXES[axis][1], "data" if axis == "pretrain" else "pretrain"
    if budget == "steps":
        lines = [f"budget: equal optimiser steps at every {key} (steps set, epochs null): a smaller "
                 "fraction repeats its images more often, so the curve measures data, not compute "
                 "(--budget epochs: equal epochs instead)"]
    else:
        lines = [f"budget: equal epochs at every {key} (epochs set, steps null): fraction f also trains "
                 "f x the steps of the full set, so data and compute change together (--budget steps: equal steps)"]
    lines.append(f"axis: {key}: " + (
        "pretraining sees that nested share of the training images; finetuning and the re-ranker's refit see all "
        "of them" if axis == "pretrain" else
        "pretraining and finetuning both see that nested share of the training images") +
        f" (--axis {other}: {AXES[other][1]} instead)")
    seen = set()
    for cfg in configs:
        fraction = cfg.pretrain.data_fraction if axis == "pretrain" else cfg.data.fraction
        if fraction in seen:
            continue
        seen.add(fraction)
        images = training_images(cfg)
        parts = []
        for stage in TRAIN_STAGES:
            train = getattr(cfg, stage)
            share = cfg.pretrain.data_fraction if stage == "pretrain" else 1.0
            if images is None:
                sees = f" on {share:g} of them" if share < 1 else ""
                parts.append(f"{stage} " + (f"{train.steps} steps" if train.steps else f"{train.epochs} epochs") + sees)
                continue
            seen_images = nested_count(images, share)  # the pretraining subset, as the pretrain stage counts it
            pairs = seen_images * (cfg.data.synthetic.captions_per_image if train.captions == "all" else 1)
            per_epoch = pairs // train.batch_size  # the loop drops the last partial batch
            steps = train.steps if train.steps is not None else train.epochs * per_epoch
            sees = f" on {seen_images} images" if axis == "pretrain" else ""
            parts.append(f"{stage} {steps} steps{sees} = {steps / max(per_epoch, 1):.1f} epochs")
        where = f"{images} training images" if images is not None else "training images: see preprocessing"
        lines.append(f"  {'fraction' if axis == 'data' else key} {fraction:g}: {where}; " + ", ".join(parts))
    return lines


# ------------------------------------------------------------------ checks before queueing
def planned_configs(plan: Sequence[PlannedExp], params: Path) -> list[Config]:
    """The validated params each planned experiment will run with.

    Applies the ``-S`` values with DVC's own writer (``dvc.utils.hydra.apply_overrides``,
    what ``dvc exp run -S`` calls) to a copy of ``params``; a bad key or value raises
    ParamsError naming the experiment and the key, before anything is queued."""
    from dvc.utils.hydra import apply_overrides

    configs = []
    with tempfile.TemporaryDirectory() as tmp:
        for exp in plan:
            copy = Path(tmp) / "params.yaml"
            shutil.copyfile(params, copy)
            apply_overrides(copy, exp.set_params())
            try:
                configs.append(load_config(copy))
            except ParamsError as err:
                raise ParamsError(f"experiment {exp.name}: {str(err).replace(str(copy), str(params))}") from None
    return configs


# ------------------------------------------------------------------ running
def _show(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# DVC's closing line on every error, which says nothing about the error itself
DVC_SUPPORT_LINE = "Having any troubles?"


def error_line(output: str) -> str:
    """The line of a failed command's output that names its error: DVC's ``ERROR:`` line
    where there is one, else the last line that is not DVC's support boilerplate."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    lines = [line for line in lines if DVC_SUPPORT_LINE not in line]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StudyFailed(f"study: `{_show(cmd)}` failed ({proc.returncode}): {error_line(proc.stderr + proc.stdout)}")
    return proc.stdout


# `dvc queue status` fails now and then while several workers run: two workers write the
# celery pidbox reply file at once and the status command reads invalid JSON
# (treeverse/dvc-task 73). A poll that fails is tried again, up to this many times in a row.
STATUS_RETRIES = 5


def _queue_status(dvc: Sequence[str], poll_s: float, retries: int = STATUS_RETRIES) -> str:
    for attempt in range(retries + 1):
        try:
            return _run([*dvc, "queue", "status"])
        except StudyFailed as err:
            if attempt == retries:
                raise StudyFailed(f"{err} ({retries + 1} polls in a row)") from None
            echo(f"{err}: polling again")
            time.sleep(poll_s)
    raise AssertionError("unreachable")


def _start_worker(cmd: Sequence[str], env: dict) -> None:
    """Start queue worker(s). Output goes to a file, never to a pipe: the worker is forked
    from this command and keeps its inherited output open for as long as it runs, so a
    captured ``dvc queue start`` returns only when its worker has finished the whole queue
    (and the next GPU's worker starts only then)."""
    import os

    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            out.seek(0)
            last = out.read().strip().splitlines()
            raise StudyFailed(f"study: `{_show(cmd)}` failed: {last[-1] if last else proc.returncode}")


def queue_states(status_output: str, names: Sequence[str], skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Status (lower case) of each named experiment in ``dvc queue status`` output.

    ``skip``: task ids to ignore, those the queue held before this study queued its own (an
    earlier study's finished task of the same name stays listed)."""
    states = {}
    for line in status_output.splitlines():
        tokens = line.split()
        if tokens and tokens[0] in skip:
            continue
        for name in names:
            if name in tokens:
                states[name] = tokens[-1].lower()
    return states


def workers_alive(status_output: str) -> Optional[int]:
    """Active + idle workers from ``dvc queue status``'s last line (None: not listed)."""
    match = re.search(r"Worker status: (\d+) active, (\d+) idle", status_output)
    return int(match[1]) + int(match[2]) if match else None


def _start_workers(starts: Sequence[tuple[dict, list[str]]], dvc: Sequence[str], cluster: ClusterSettings) -> None:
    for env, cmd in starts:
        _start_worker((list(dvc) if cmd[0] == "dvc" else [sys.executable]) + cmd[1:], env)
        if cluster.gpus:
            echo(f"study: queue worker started with CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")


def queue_tasks(status_output: str) -> frozenset[str]:
    """Task ids listed by ``dvc queue status`` (the first column of its rows)."""
    rows = status_output.split("\n\n")[0].splitlines()[1:]  # header first; "Worker status" after a blank line
    return frozenset(line.split()[0] for line in rows if line.split())


def existing_experiments(dvc: Sequence[str]) -> set[str]:
    """Names of the experiments of the current commit."""
    return {line.strip() for line in _run([*dvc, "exp", "list", "--name-only"]).splitlines() if line.strip()}


# DVC's own worker spawn, for the k-th worker (what `dvc queue start -j k` calls for it)
SPAWN_WORKER = "from dvc.repo import Repo; Repo('.').experiments.celery_queue._spawn_worker({num})"


def worker_starts(jobs: int, gpus: Sequence[str], tracking_uri: Optional[str] = None,
                  gpus_per_exp: int = 1) -> list[tuple[dict, list[str]]]:
    """(environment changes, command) of each queue worker start.

    DVC's queue has no per-worker environment: a worker inherits the environment of the
    process that spawned it. ``CUDA_VISIBLE_DEVICES=1 dvc queue start -j 2`` adds worker 2
    only if ``dvc queue start`` sees worker 1 running, and it asks the workers over celery:
    a worker busy with a training run on a loaded machine may not answer in time, and then
    worker 1 is spawned a second time, in GPU 1's environment (seen here: all four
    experiments of a test study ran on GPU 0). So with ``gpus``, dmp spawns worker k itself
    with DVC's own spawn function, in the k-th GPU's environment, asking nothing.

    ``gpus_per_exp`` N > 1: worker k gets the k-th group of N ids and ``DMP_NPROC_PER_NODE=N``,
    so its training stages run N processes under torchrun (stages/_common.py)."""
    extra = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    if not gpus:
        return [(extra, ["dvc", "queue", "start", "-j", str(jobs)])]
    if len(gpus) % gpus_per_exp:
        raise StudyFailed(f"study: --gpus {','.join(gpus)} is not a multiple of --gpus-per-exp {gpus_per_exp}")
    groups = [",".join(gpus[i:i + gpus_per_exp]) for i in range(0, len(gpus), gpus_per_exp)]
    if gpus_per_exp > 1:
        extra = {**extra, "DMP_NPROC_PER_NODE": str(gpus_per_exp)}
    return [({**extra, "CUDA_VISIBLE_DEVICES": group}, ["python", "-c", SPAWN_WORKER.format(num=k)])
            for k, group in enumerate(groups, start=1)]


def check_tracking(workers: int, params: Path, tracking_uri: Optional[str]) -> None:
    """Refuse several workers on one SQLite MLflow store (concurrent writers lock it)."""
    from dmp_core.tracking import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(load_config(params))
    if workers > 1 and is_sqlite(uri):
        raise StudyFailed(f"study: {workers} workers would write to one SQLite MLflow store ({uri}) at once "
                          "('database is locked'): start `mlflow server` with a database backend and pass "
                          "--tracking-uri http://... (docs/CLUSTER.md), or use one worker")


# ------------------------------------------------------------------ resuming from exported runs
def skip_finished(plan: Sequence[PlannedExp], configs: Sequence[Config],
                  runs: Path) -> tuple[list[PlannedExp], list[str]]:
    """(the planned experiments still to run, one line per skipped one and per name clash).

    A planned experiment is finished when a run exported to ``runs`` (``runs/<name>/params.yaml``
    and ``reports/evaluate/metrics.json``, :func:`orchestration.export.finished_runs`) has the
    same method params and seed, under any name: canonical params as the report compares them
    (``dmp_core.report``), so a key the export's params.yaml lacks counts as its schema default
    (``seed-denoising-s0`` is ``pts-denoising-f100-s0``) and bookkeeping keys (``data.root``,
    tracking, logging) do not count. It cannot tell code changes: the export's ``source.json``
    names the commit it was made at."""
    from dmp_core.report.runs import canonical_params, method_params, param_diff

    exported = finished_runs(runs)
    by_key: dict[tuple, FinishedRun] = {}
    for run in exported:
        by_key.setdefault(run.key, run)
    by_name = {run.name: run for run in exported}
    todo, lines = [], []
    for exp, cfg in zip(plan, configs, strict=True):
        params = canonical_params(cfg)
        match = by_key.get((method_params(params), params.get("seed")))
        if match is None:
            todo.append(exp)
            clash = by_name.get(exp.name)
            if clash is not None:
                differ = ", ".join(f"{k}={v!r}" for k, v in param_diff(clash.params, params, keep_seed=True).items())
                lines.append(f"note: {runs / exp.name} holds a run with other params "
                             f"({differ or 'see its params.yaml'}); "
                             f"{exp.name} of this study replaces its files when it finishes")
            continue
        at = match.source(runs).get("baseline")
        lines.append(f"skip {exp.name}: finished as {runs / match.name} (same method params and seed, "
                     + (f"made on commit {at[:7]}" if at else "commit not recorded: no source.json")
                     + (f"; {match.note}" if match.note else "") + ")")
    names = ", ".join(exp.name for exp in todo)
    lines.append(f"{len(todo)} of {len(plan)} planned runs remain" + (f": {names}" if todo else
                 f": every one is finished in {runs}"))
    return todo, lines


def write_plan(runs: Path, plan: Sequence[PlannedExp]) -> Path:
    """Record ``plan`` in ``runs/plan.json``: one ``{"name", "params"}`` per planned experiment
    (``params``: its overrides, dotted key -> value text), merged by name with the entries there
    (another invocation's plan: its names are kept, the same name is replaced), sorted by name,
    as deterministic JSON (sorted keys, no time), written atomically. ``dmp report --runs`` reads
    it and names the planned runs that no run is yet (:func:`orchestration.runs.planned_runs`)."""
    from dmp_core.io import write_json

    path = runs / PLAN
    try:
        entries = {entry["name"]: entry for entry in plan_entries(path)}
    except (OSError, ValueError) as err:
        raise StudyFailed(f"study: {path} is not a readable plan ({err}); repair it (a merge conflict?) "
                          "or remove it, then run the study again") from None
    entries |= {exp.name: {"name": exp.name, "params": dict(exp.overrides)} for exp in plan}
    write_json(path, [entries[name] for name in sorted(entries)])
    return path


def _record_plan(runs: Optional[Path], plan: Sequence[PlannedExp]) -> None:
    if runs is not None:
        path = write_plan(runs, plan)
        echo(f"study: the plan ({len(plan)} runs) is recorded in {path}: the report names the planned runs not "
             f"run yet; commit it with the exports")


def commit_line(runs: Path, names: Sequence[str], kind: str) -> str:
    message = f"study {kind}: {len(names)} runs exported to {runs}"
    return f"git add {shlex.quote(str(runs))} && git commit -m {shlex.quote(message)}"


def queue_rows(status_output: str, names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(task id, name, status in lower case) of each ``dvc queue status`` row of the named experiments."""
    rows = []
    for line in status_output.split("\n\n")[0].splitlines()[1:]:
        tokens = line.split()
        for name in names:
            if name in tokens:
                rows.append((tokens[0], name, tokens[-1].lower()))
    return rows


class _Exporter:
    """Exports each finished experiment of the study into ``runs`` once (None: exports nothing)."""

    def __init__(self, runs: Optional[Path], baseline: Optional[str]):
        self.runs, self.baseline, self.done = runs, baseline, []

    def __call__(self, names: Sequence[str], why: str = "") -> list[str]:
        """Export those of ``names`` not exported yet; returns those that have no experiment commit (yet)."""
        missing = []
        for name in names:
            if self.runs is None or self.baseline is None or name in self.done:
                continue
            folder = export_experiment(self.runs, name, baseline=self.baseline)
            if folder is None:
                missing.append(name)
                continue
            self.done.append(name)
            echo(f"study: exported {name}{why} to {folder}")
        return missing


def run_study(plan: Sequence[PlannedExp], *, jobs: int, dry_run: bool, params: Path, poll_s: float = 15.0,
              rerun: bool = False, policy: Sequence[str] = (), cluster: Optional[ClusterSettings] = None,
              kind: str = "study", runs: Optional[Path] = None, configs: Optional[Sequence[Config]] = None) -> int:
    """Queue, run and wait for ``plan``, then write the report; returns the report's exit
    status (``dry_run``: print the commands as a shell script, run nothing, return 0).

    ``runs`` (a folder of exported runs): the plan is recorded in ``runs/plan.json``
    (:func:`write_plan`; not on a dry run), planned experiments that an exported run already is
    are skipped (:func:`skip_finished`; ``rerun`` runs them all), and each experiment that
    finishes successfully is exported there at once (:func:`orchestration.export.export_experiment`),
    as is a finished one of this commit that the study keeps. ``configs``: the planned
    experiments' params (:func:`planned_configs`; computed when not given).

    ``cluster.engine`` other than ``queue`` hands the plan to :func:`orchestration.cluster.run_remote`."""
    cluster = cluster or ClusterSettings()
    planned: list[PlannedExp] = list(plan)  # recorded in runs/plan.json, finished or not
    skipped: list[str] = []
    if runs is not None and not rerun:
        plan, skipped = skip_finished(plan, configs if configs is not None else planned_configs(plan, params), runs)
    if cluster.engine != "queue":
        for line in skipped:
            echo(f"study: {line}")
        if not dry_run:
            _record_plan(runs, planned)
        return run_remote(plan, kind, cluster, params, dry_run=dry_run, rerun=rerun)
    dvc = [sys.executable, "-m", "dvc"]
    starts = worker_starts(jobs, cluster.gpus, cluster.tracking_uri, max(1, int(cluster.gpus_per_exp)))
    report = ["dmp", "report", "--params", str(params)]
    if runs is not None and (dry_run or finished_runs(runs)):  # the report reads the exports too (other clones')
        report += ["--runs", str(runs)]
    if dry_run:
        for line in [*policy, *skipped]:
            print(f"# {line}")
        for exp in plan:
            print(_show(exp.command()))
        for env, cmd in starts if plan else ():
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + _show(cmd))
        if plan:
            print("dvc queue status   # polled until every experiment above has finished")
        print(_show(report))
        return 0
    for line in [*policy, *skipped]:
        echo(f"study: {line}")
    check_tracking(len(starts) if cluster.gpus else jobs, params, cluster.tracking_uri)
    differ, _ = params_differ_from_head(params, load_config(params))
    if differ:
        echo(f"study: note: {params} differs from HEAD's in {', '.join(differ)}; every experiment of this study "
             f"starts from the workspace, so it includes that change")
    _record_plan(runs, planned)  # before queueing, also when every planned run is finished already

    # the commit the queued experiments are made on (HEAD may move while they run: a commit of exports)
    export = _Exporter(runs, head_sha() if runs is not None else None)
    existing = existing_experiments(dvc) if plan else set()
    todo = []
    for exp in plan:
        if exp.name in existing and not rerun:
            echo(f"study: {exp.name} exists for this commit: kept (--rerun replaces it)")
            export([exp.name], " (finished earlier)")
            continue
        if exp.name in existing:
            _run([*dvc, "exp", "remove", exp.name])
        todo.append(exp)
    copies = untracked_sources() if todo else []
    if copies:
        echo(f"study: not in git, copied into each experiment's folder (-C) but not recorded in its commit: "
             f"{', '.join(copies)}")
    copy_args = [arg for path in copies for arg in ("-C", path)]
    before = _queue_status(dvc, poll_s) if todo else ""
    # an earlier invocation's tasks still in the queue (interrupted, its workers went on): waited for, not queued twice
    active = {name: task for task, name, state in queue_rows(before, [e.name for e in todo])
              if state not in FINISHED}
    earlier = queue_tasks(before) - set(active.values()) if todo else frozenset()
    for i, exp in enumerate(todo, start=1):
        if exp.name in active:
            echo(f"study: {exp.name} is in the queue already (task {active[exp.name]}, from an earlier "
                 f"invocation): waited for, not queued again ({i}/{len(todo)})")
            continue
        _run(dvc + exp.command()[1:] + copy_args)
        echo(f"study: queued {exp.name} ({i}/{len(todo)})")
    if todo:
        _start_workers(starts, dvc, cluster)
    names = [exp.name for exp in todo]
    try:
        states = _wait(names, dvc, poll_s, earlier, starts, cluster, export)
    except BaseException as err:  # what finished is exported already: say so, and how to go on
        if isinstance(err, KeyboardInterrupt):
            echo("study: interrupted. The queue workers go on with the experiments in the queue (`dvc queue status`; "
                 "`dvc queue stop --kill` stops them). Run the same command again: it exports what has finished, "
                 "waits for what is still in the queue and runs what is missing")
        _exported(export, kind)
        raise
    missing = export([n for n in names if states.get(n) == "success"])
    for _ in range(2):  # a task can be listed as a success a moment before its experiment commit exists
        if not missing:
            break
        time.sleep(poll_s)
        missing = export(missing)
    if missing:
        echo(f"study: {len(missing)} finished but not exported: no experiment commit found ({', '.join(missing)}); "
             f"`dmp report --export-runs {runs}` exports every finished experiment later")
    failed = [n for n in names if states.get(n) != "success"]
    if failed:
        echo(f"study: {len(failed)} failed ({', '.join(failed)}); see `dvc queue logs <name>`"
             + ("; not exported" if runs is not None else ""))
    if runs is not None and "--runs" not in report and finished_runs(runs):  # exported by this study
        report += ["--runs", str(runs)]
    code = subprocess.run([sys.executable, "-m", "stages", *report[1:]]).returncode
    _exported(export, kind)
    return code


def _exported(export: _Exporter, kind: str) -> None:
    if export.runs is not None and export.done:
        echo(f"study: {len(export.done)} runs exported to {export.runs} ({', '.join(export.done)}); keep them:\n"
             f"  {commit_line(export.runs, export.done, kind)}")


def _wait(names: Sequence[str], dvc: Sequence[str], poll_s: float, earlier: frozenset[str],
          starts: Sequence[tuple[dict, list[str]]], cluster: ClusterSettings, export: _Exporter) -> dict[str, str]:
    """Poll ``dvc queue status`` until every named experiment has finished (or no worker is left
    to finish them), restarting stopped workers and exporting each success at once; the last states."""
    last = ""
    states: dict[str, str] = {}
    dead_polls = restarts = 0
    while names:
        status = _queue_status(dvc, poll_s)
        states = queue_states(status, names, skip=earlier)
        done = [n for n in names if states.get(n) in FINISHED]
        line = f"study: {len(done)}/{len(names)} finished, {sum(states.get(n) == 'running' for n in names)} running"
        if line != last:
            echo(line)
            last = line
        export([n for n in done if states[n] == "success"])
        if len(done) == len(names):
            break
        waiting = [n for n in names if states.get(n) == "queued"]
        running = [n for n in names if states.get(n) == "running"]
        # two polls in a row, so that a worker still starting up is not taken for a stopped one
        dead_polls = dead_polls + 1 if (waiting or running) and workers_alive(status) == 0 else 0
        if dead_polls == 2 and not waiting:  # a task's own worker collects its results: none will
            lost = running
            echo(f"study: {len(lost)} experiments are marked running but no queue worker is alive to collect "
                 f"them ({', '.join(lost)}; a worker was killed?): not waited for. `dvc queue logs NAME` shows how "
                 f"far each got; re-running the study keeps the finished experiments, and their finished "
                 f"stages come from the run cache")
            break
        if dead_polls == 2:
            if restarts == WORKER_RESTARTS:
                raise StudyFailed(f"study: the queue workers stopped {restarts + 1} times with {len(waiting)} "
                                  f"experiments waiting ({', '.join(waiting)}); see `dvc queue logs <name>`, "
                                  f"then `dvc queue start` and `dmp report`")
            restarts += 1
            echo(f"study: no queue worker is alive and {len(waiting)} experiments wait (DVC stops workers early: "
                 f"iterative/dvc 10562): starting them again ({restarts}/{WORKER_RESTARTS})")
            _start_workers(starts, dvc, cluster)
            dead_polls = 0
        time.sleep(poll_s)
    return states


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ParamsError(f"--fractions: {text!r} is not a comma-separated list of numbers") from None
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if not values or bad:
        raise ParamsError(f"--fractions: every fraction must be in (0, 1] (got {text!r})")
    return values


def parse_variants(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in KNOWN_VARIANTS]
    if not values or unknown:
        raise ParamsError(f"--variants: unknown variant(s) {', '.join(unknown) or text!r} "
                          f"(known: {', '.join(KNOWN_VARIANTS)})")
    return values
