"""``dmp study seeds|ablations|scaling``: queue the planned DVC experiments, run them, report
(:mod:`orchestration.study` plans and runs them)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmp_core.config import ParamsError
from orchestration.study import (FRACTIONS_TEXT, VARIANTS_TEXT, Budget, ablation_plan, budget_lines, parse_fractions,
                                 parse_variants, planned_configs, run_study, scaling_plan, seeds_plan)
from stages._common import ParamsOpt, guarded, load

study_app = typer.Typer(help="DVC experiment studies (seeds, ablations, data scaling) on one machine or many.",
                        no_args_is_help=True)


# ------------------------------------------------------------------ the commands
SeedsOpt = Annotated[int, typer.Option(min=1, help="seeds per setting (seed=0..N-1)")]
JobsOpt = Annotated[int, typer.Option(min=1, help="parallel queue workers (dvc queue start -j)")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="print the commands, run nothing")]
RerunOpt = Annotated[bool, typer.Option("--rerun", help="replace experiments of the same name that already exist")]


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


PollOpt = Annotated[float, typer.Option("--poll-s", min=0.5, help="seconds between `dvc queue status` polls")]


@study_app.command("ablations")
@guarded
def ablations_cmd(ctx: typer.Context, seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False, rerun: RerunOpt = False,
                  poll_s: PollOpt = 15.0, params: ParamsOpt = Path("params.yaml")) -> None:
    """MAMO, denoising (HOG), pixel targets, no VICReg, no ITC, text mask ratio 0.25."""
    load(params)  # fail early on a bad params file
    plan = ablation_plan(seeds)
    planned_configs(plan, params)
    _exit(run_study(plan, jobs=jobs, dry_run=dry_run, params=params, rerun=rerun, poll_s=poll_s, cluster=ctx.obj,
                    kind="ablations"))


@study_app.command("seeds")
@guarded
def seeds_cmd(
    ctx: typer.Context,
    variants: Annotated[str, typer.Option(help="objective.variant values, comma-separated")] = VARIANTS_TEXT,
    seeds: SeedsOpt = 3,
    first_seed: Annotated[int, typer.Option(min=0, help="skip seeds below this one (e.g. 1 after `make run`, "
                                                        "whose denoising-default and mamo-default are seed 0)")] = 0,
    jobs: JobsOpt = 1, dry_run: DryOpt = False, rerun: RerunOpt = False,
    poll_s: PollOpt = 15.0, params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Both variants at the params.yaml settings with several seeds (mean ± std, seed intervals)."""
    load(params)
    plan = seeds_plan(seeds, parse_variants(variants), first_seed)
    planned_configs(plan, params)
    _exit(run_study(plan, jobs=jobs, dry_run=dry_run, params=params, rerun=rerun, poll_s=poll_s, cluster=ctx.obj,
                    kind="seeds"))


@study_app.command("scaling")
@guarded
def scaling_cmd(
    ctx: typer.Context,
    fractions: Annotated[str, typer.Option(help="data.fraction values, comma-separated")] = FRACTIONS_TEXT,
    variants: Annotated[str, typer.Option(help="objective.variant values, comma-separated")] = VARIANTS_TEXT,
    budget: Annotated[str, typer.Option(help="steps: equal optimiser steps at every fraction (the default); "
                                             "epochs: equal epochs")] = "steps",
    epochs: Annotated[int, typer.Option(min=1, help="epochs per stage with --budget epochs")] = 1,
    seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False, rerun: RerunOpt = False,
    poll_s: PollOpt = 15.0, params: ParamsOpt = Path("params.yaml"),
) -> None:
    """data.fraction x variant at an equal training budget (equal steps by default)."""
    if budget not in ("steps", "epochs"):
        raise ParamsError(f"--budget: {budget!r} is not steps or epochs")
    base = load(params)
    kind: Budget = "steps" if budget == "steps" else "epochs"
    plan = scaling_plan(seeds, parse_fractions(fractions), parse_variants(variants), budget=kind, base=base, epochs=epochs)
    configs = planned_configs(plan, params)
    _exit(run_study(plan, jobs=jobs, dry_run=dry_run, params=params, rerun=rerun,
                    policy=budget_lines(kind, configs), poll_s=poll_s, cluster=ctx.obj, kind="scaling"))


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
