"""``dmp study ablations|scaling``: queue the planned DVC experiments, run them, report.

Each study queues one ``dvc exp run --queue --name <name> -S key=value ...`` per
(setting, seed), starts the queue with ``dvc queue start -j J``, polls
``dvc queue status`` until every queued experiment has finished, then writes the
report (``dmp report``). ``--dry-run`` prints the commands and runs nothing.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

import typer

from stages._common import ParamsOpt, echo, guarded, load

study_app = typer.Typer(help="Queued DVC experiment studies (ablations, data scaling).", no_args_is_help=True)

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
VARIANTS = ("mamo", "denoising")
# (name, overrides): the planned ablations of issue 5; the denoising rows state the
# variant explicitly so they do not depend on the baseline's params.yaml
ABLATIONS: tuple[tuple[str, dict[str, str]], ...] = (
    ("mamo", {"objective.variant": "mamo"}),
    ("denoise-hog", {"objective.variant": "denoising"}),
    ("denoise-pixel", {"objective.variant": "denoising", "objective.mim_target": "pixel"}),
    ("denoise-no-vicreg", {"objective.variant": "denoising", "objective.vicreg": "false"}),
    ("denoise-no-itc", {"objective.variant": "denoising", "objective.itc": "false"}),
    ("denoise-text025", {"objective.variant": "denoising", "objective.text_mask_ratio": "0.25"}),
)
FINISHED = ("success", "failed", "killed", "stopped")


@dataclass
class PlannedExp:
    name: str
    overrides: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        cmd = ["dvc", "exp", "run", "--queue", "--name", self.name]
        for key, value in self.overrides.items():
            cmd += ["-S", f"{key}={value}"]
        return cmd


def ablation_plan(seeds: int) -> list[PlannedExp]:
    return [PlannedExp(f"abl-{name}-s{seed}", {**overrides, "seed": str(seed)})
            for name, overrides in ABLATIONS for seed in range(seeds)]


def scaling_plan(seeds: int, fractions: Sequence[float] = FRACTIONS, variants: Sequence[str] = VARIANTS) -> list[PlannedExp]:
    return [PlannedExp(f"scale-{variant}-f{round(fraction * 100):03d}-s{seed}",
                       {"objective.variant": variant, "data.fraction": f"{fraction:g}", "seed": str(seed)})
            for variant in variants for fraction in fractions for seed in range(seeds)]


def _show(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        echo(f"study: `{_show(cmd)}` failed: {last[-1] if last else proc.returncode}")
        raise typer.Exit(1)
    return proc.stdout


def queue_states(status_output: str, names: Sequence[str]) -> dict[str, str]:
    """Status (lower case) of each named experiment in ``dvc queue status`` output."""
    states = {}
    for line in status_output.splitlines():
        tokens = line.split()
        for name in names:
            if name in tokens:
                states[name] = tokens[-1].lower()
    return states


def run_study(plan: Sequence[PlannedExp], *, jobs: int, dry_run: bool, params: Path, poll_s: float = 15.0) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    start = ["dvc", "queue", "start", "-j", str(jobs)]
    report = ["dmp", "report", "--params", str(params)]
    if dry_run:
        for exp in plan:
            print(_show(exp.command()))
        print(_show(start))
        print("dvc queue status   # polled until every experiment above has finished")
        print(_show(report))
        return

    for i, exp in enumerate(plan, start=1):
        _run(dvc + exp.command()[1:])
        echo(f"study: queued {exp.name} ({i}/{len(plan)})")
    _run(dvc + start[1:])
    names = [exp.name for exp in plan]
    last = ""
    while True:
        states = queue_states(_run(dvc + ["queue", "status"]), names)
        done = [n for n in names if states.get(n) in FINISHED]
        line = f"study: {len(done)}/{len(names)} finished, {sum(states.get(n) == 'running' for n in names)} running"
        if line != last:
            echo(line)
            last = line
        if len(done) == len(names):
            break
        time.sleep(poll_s)
    failed = [n for n in names if states.get(n) != "success"]
    if failed:
        echo(f"study: {len(failed)} failed ({', '.join(failed)}); see `dvc queue logs <name>`")

    from stages.report import write_report

    write_report(load(params), reports=Path("reports"), prepared=Path("data/prepared"))


SeedsOpt = Annotated[int, typer.Option(min=1, help="seeds per setting (seed=0..N-1)")]
JobsOpt = Annotated[int, typer.Option(min=1, help="parallel queue workers (dvc queue start -j)")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="print the commands, run nothing")]


@study_app.command("ablations")
@guarded
def ablations_cmd(seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False, params: ParamsOpt = Path("params.yaml")) -> None:
    """MAMO, denoising (HOG), pixel targets, no VICReg, no ITC, text mask ratio 0.25."""
    load(params)  # fail early on a bad params file
    run_study(ablation_plan(seeds), jobs=jobs, dry_run=dry_run, params=params)


@study_app.command("scaling")
@guarded
def scaling_cmd(seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False, params: ParamsOpt = Path("params.yaml")) -> None:
    """data.fraction in {0.1, 0.25, 0.5, 1.0} for both variants."""
    load(params)
    run_study(scaling_plan(seeds), jobs=jobs, dry_run=dry_run, params=params)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
