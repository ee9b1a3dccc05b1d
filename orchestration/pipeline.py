"""The pipeline runner behind ``dmp pipeline`` (what ``make run`` calls): the whole pipeline on the current params,
with the baseline kept where later experiments cannot overwrite it.

1. ``dvc repro``: every stage in the workspace (the params.yaml variant);
2. ``dvc exp save -f -n <variant>-default``: the workspace result saved as a named DVC
   experiment (a git commit under ``refs/exps``), so a later ``dvc exp run`` in the
   workspace, which overwrites the workspace outputs, cannot lose it. Only when
   params.yaml equals HEAD's (otherwise the workspace is not the default) and the tree
   differs from HEAD (otherwise HEAD's commit already is the baseline). Untracked
   output files (results.md, figures, metrics) are included with ``-I``: DVC 3.67
   leaves untracked files out of a saved experiment otherwise;
3. ``dvc exp run --temp -n <other>-default -S ++objective.variant=<other>``: the other
   variant in a temporary copy, skipped when an experiment of that name already exists
   for this commit (``--rerun`` replaces it). Untracked (not ignored) source files are
   copied into the temporary copy with ``-C``: DVC copies only git-tracked files;
4. ``dvc repro report``: the report again, now that the experiment table holds both.

At the end it prints each step's wall time and either "tree clean" or the changed
files and the ``git add ... && git commit`` line that keeps this run as the committed
baseline.
"""
from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from dmp_core.config import Config
from orchestration.repo import (echo, git_status, is_pipeline_file, params_differ_from_head, pipeline_outputs,
                                untracked_sources)

VARIANTS = ("denoising", "mamo")


class PipelineFailed(Exception):
    """A dvc command failed (its own output says why)."""


class StepTimer:
    """Wall time of each named step, printed as a small table at the end."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.steps.append((label, time.perf_counter() - t0))

    def lines(self) -> list[str]:
        width = max((len(label) for label, _ in self.steps), default=10)
        rows = [f"  {label:<{width}}  {seconds:7.1f} s" for label, seconds in self.steps]
        total = sum(s for _, s in self.steps)
        return ["wall time per step:", *rows, f"  {'total':<{width}}  {total:7.1f} s"]


def dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dvc", *args]
    if not capture:
        echo("$ dvc " + " ".join(shlex.quote(a) for a in args))
    return subprocess.run(cmd, check=False, capture_output=capture, text=True)


def dvc_or_fail(*args: str) -> None:
    if dvc(*args).returncode != 0:
        raise PipelineFailed(f"'dvc {' '.join(args)}' failed (see its output above)")


def existing_experiments() -> set[str]:
    """Names of the DVC experiments of the current commit."""
    out = dvc("exp", "list", "--name-only", capture=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


# ------------------------------------------------------------------ the baseline experiment
def save_baseline(name: str, outputs: list[str]) -> None:
    """``dvc exp save -f -n NAME`` including the untracked pipeline outputs."""
    include = [path for code, path in git_status() if code == "??" and is_pipeline_file(path, outputs)]
    args = ["exp", "save", "-f", "-n", name]
    for path in include:
        args += ["-I", path]
    dvc_or_fail(*args)


# ------------------------------------------------------------------ what to commit
def _listing(entries: list[tuple[str, str]], limit: int = 8) -> list[str]:
    """``  XY path`` lines; more than ``limit`` untracked files in one folder become one line."""
    from collections import defaultdict

    folders: dict[str, list[str]] = defaultdict(list)
    for code, path in entries:
        if code == "??":
            folders[str(Path(path).parent)].append(path)
    lines, shown = [], set()
    for code, path in entries:
        folder = str(Path(path).parent)
        if code == "??" and len(folders[folder]) > limit:
            if folder not in shown:
                shown.add(folder)
                lines.append(f"  ?? {folder}/ ({len(folders[folder])} files)")
            continue
        lines.append(f"  {code} {path}")
    return lines


def tree_report(outputs: list[str], variant: str) -> list[str]:
    """"tree clean", or the changed files and the git line that commits them as the baseline."""
    changed = git_status()
    if not changed:
        return ["tree clean: the committed state is this run's baseline"]
    sources = set(untracked_sources())  # new code in stages/, dmp_core/: it made these results too
    kept = [(code, path) for code, path in changed
            if code != "??" or is_pipeline_file(path, outputs) or path in sources]
    keep = [path for _, path in kept]
    other = [entry for entry in changed if entry not in kept]
    lines = [f"{len(changed)} file(s) differ from the last commit:", *_listing(changed)]
    if keep:
        message = f"Baseline results: {variant} (dmp pipeline)"
        lines += ["to keep this run as the committed baseline (results, dvc.lock and the code that made them):",
                  f"  git add -A -- {' '.join(shlex.quote(p) for p in keep)} && git commit -m {shlex.quote(message)}"]
    if other:
        lines += ["untracked and not written by the pipeline, left out of that line:", *_listing(other)]
    return lines


def run_comparison(params: Path, cfg: Config, variant: str, outputs: list[str], timer: StepTimer,
                   rerun: bool) -> None:
    """Steps 2-4 of the module docstring."""
    differ, why = params_differ_from_head(params, cfg)
    if differ is None or differ:
        reason = why or f"{params} differs from HEAD's in {', '.join(differ or [])}"
        echo(f"dmp pipeline: {reason}: the workspace is not the default, so no '<variant>-default' experiments "
             f"are saved or run (restore the default with `git checkout {params}`)")
        with timer.step("dvc repro report"):
            dvc_or_fail("repro", "report")
        return
    baseline = f"{variant}-default"
    if git_status():
        with timer.step(f"dvc exp save -n {baseline}"):
            save_baseline(baseline, outputs)
    else:
        echo(f"dmp pipeline: the workspace equals HEAD, whose commit is the baseline: no '{baseline}' saved")
    other = next(v for v in VARIANTS if v != variant)
    name = f"{other}-default"
    exists = name in existing_experiments()
    if exists and not rerun:
        echo(f"dmp pipeline: experiment '{name}' exists for this commit: kept (--rerun runs it again)")
    else:
        copies = untracked_sources()
        if copies:
            echo(f"dmp pipeline: not in git, copied into the experiment's temporary folder (-C) but not recorded "
                 f"in its commit: {', '.join(copies)}")
        with timer.step(f"dvc exp run --temp -n {name}"):
            if exists:
                dvc_or_fail("exp", "remove", name)
            copy_args = [arg for path in copies for arg in ("-C", path)]
            dvc_or_fail("exp", "run", "--temp", "-n", name, *copy_args, "-S", f"++objective.variant={other}")
    with timer.step("dvc repro report"):
        dvc_or_fail("repro", "report")  # always_changed: re-reads the experiment table


def run_pipeline(params: Path, cfg: Config, *, compare: bool = True, rerun: bool = False) -> int:
    """Steps 1-4 of the module docstring, then the wall times and the tree report;
    returns 0, or 1 when a dvc command failed."""
    variant = cfg.objective.variant
    outputs = pipeline_outputs()
    timer = StepTimer()
    try:
        with timer.step("dvc repro"):
            dvc_or_fail("repro")
        if compare:
            run_comparison(params, cfg, variant, outputs, timer, rerun)
    except PipelineFailed as err:
        for line in timer.lines():
            echo(line)
        echo(f"dmp pipeline: error: {err}")
        return 1
    for line in [*timer.lines(), *tree_report(outputs, variant)]:
        echo(line)
    echo("dmp pipeline: done; read reports/results.md")
    return 0
