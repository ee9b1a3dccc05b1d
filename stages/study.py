"""``dmp study seeds|ablations|scaling``: queue the planned DVC experiments that are not finished
yet, run them, export each as it finishes, report (:mod:`orchestration.study` plans and runs them)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmp_core.config import ParamsError
from orchestration.study import (AXES, FRACTIONS_TEXT, VARIANTS_TEXT, Axis, Budget, ablation_plan, budget_lines,
                                 parse_fractions, parse_variants, planned_configs, run_study, scaling_plan,
                                 seeds_plan)
from stages._common import ParamsOpt, guarded, load

study_app = typer.Typer(help="DVC experiment studies (seeds, ablations, data scaling) on one machine or many.",
                        no_args_is_help=True)

SeedsOpt = Annotated[int, typer.Option(min=1, help="seeds per setting (seed=0..N-1)")]
JobsOpt = Annotated[int, typer.Option(min=1, help="parallel queue workers (dvc queue start -j)")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="print the commands, run nothing")]
RerunOpt = Annotated[bool, typer.Option("--rerun", help="run every planned experiment again, finished or not")]
PollOpt = Annotated[float, typer.Option("--poll-s", min=0.5, help="seconds between `dvc queue status` polls")]
RunsOpt = Annotated[Path, typer.Option("--runs", help="exported runs (DIR/<name>/): a planned experiment that one of "
                                                      "them is (same method params and seed) is not run again; each "
                                                      "experiment is exported there as it finishes, and the plan "
                                                      "recorded in DIR/plan.json (the report names what is not run)")]
VariantsOpt = Annotated[str, typer.Option(help="objective.variant values, comma-separated")]


def _study(ctx: typer.Context, plan: list, params: Path, kind: str, policy=None, **kw) -> None:
    configs = planned_configs(plan, params)  # every planned experiment validated before anything runs
    code = run_study(plan, params=params, configs=configs, cluster=ctx.obj, kind=kind,
                     policy=policy(configs) if policy else (), **kw)
    if code:
        raise typer.Exit(code)


@study_app.command("ablations")
@guarded
def ablations_cmd(ctx: typer.Context, seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False,
                  rerun: RerunOpt = False, poll_s: PollOpt = 15.0, runs: RunsOpt = Path("reports/runs"),
                  params: ParamsOpt = Path("params.yaml")) -> None:
    """MAMO, denoising (HOG), pixel targets, no VICReg, no ITC, text mask ratio 0.25."""
    load(params)  # fail early on a bad params file
    _study(ctx, ablation_plan(seeds), params, "ablations", jobs=jobs, dry_run=dry_run, rerun=rerun, poll_s=poll_s,
           runs=runs)


@study_app.command("seeds")
@guarded
def seeds_cmd(
    ctx: typer.Context, variants: VariantsOpt = VARIANTS_TEXT, seeds: SeedsOpt = 3,
    first_seed: Annotated[int, typer.Option(min=0, help="skip seeds below this one")] = 0,
    jobs: JobsOpt = 1, dry_run: DryOpt = False, rerun: RerunOpt = False, poll_s: PollOpt = 15.0,
    runs: RunsOpt = Path("reports/runs"), params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The variants at the params.yaml settings with several seeds (mean ± std, seed intervals)."""
    load(params)
    _study(ctx, seeds_plan(seeds, parse_variants(variants), first_seed), params, "seeds", jobs=jobs, dry_run=dry_run,
           rerun=rerun, poll_s=poll_s, runs=runs)


@study_app.command("scaling")
@guarded
def scaling_cmd(
    ctx: typer.Context,
    axis: Annotated[str, typer.Option(help="pretrain: pretrain.data_fraction (pretraining sees the share, finetuning "
                                           "every image; pts-*); data: data.fraction (the whole pipeline; scale-*)")
                    ] = "pretrain",
    fractions: Annotated[str, typer.Option(help="fractions, comma-separated")] = FRACTIONS_TEXT,
    variants: VariantsOpt = VARIANTS_TEXT,
    budget: Annotated[str, typer.Option(help="steps: equal optimiser steps at every fraction (the default); "
                                             "epochs: equal epochs")] = "steps",
    epochs: Annotated[int, typer.Option(min=1, help="epochs per stage with --budget epochs")] = 1,
    seeds: SeedsOpt = 1, jobs: JobsOpt = 1, dry_run: DryOpt = False, rerun: RerunOpt = False,
    poll_s: PollOpt = 15.0, runs: RunsOpt = Path("reports/runs"), params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Pretraining data (or all data) x variant at an equal training budget (equal steps by default)."""
    if budget not in ("steps", "epochs") or axis not in AXES:
        raise ParamsError(f"--budget: {budget!r} is not steps or epochs" if axis in AXES else
                          f"--axis: {axis!r} is not {' or '.join(AXES)}")
    base = load(params)
    length: Budget = "steps" if budget == "steps" else "epochs"
    along: Axis = "pretrain" if axis == "pretrain" else "data"
    plan = scaling_plan(seeds, parse_fractions(fractions), parse_variants(variants), budget=length, base=base,
                        epochs=epochs, axis=along)
    _study(ctx, plan, params, "scaling", lambda cfgs: budget_lines(length, cfgs, axis=along),
           jobs=jobs, dry_run=dry_run, rerun=rerun, poll_s=poll_s, runs=runs)


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
