"""``dmp study``: the planned ``dvc exp run`` command lines (dry run), the params each
planned experiment runs with (applied with DVC's own ``-S`` writer to the real
params.yaml), the scaling study's training budget, and the queue -> wait -> report
flow against a stand-in for the dvc command."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import orchestration.study as study
from dmp_core.config import ParamsError, load_config
from orchestration.cluster import ClusterSettings
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _dry(*args: str) -> tuple[list[str], list[list[str]]]:
    """(policy comment lines, commands) of a dry run."""
    # no tracking URI from the environment (another test's process may have set one)
    # --runs: an absent folder (no exported runs), unless the test names one
    runs = [] if "--runs" in args else ["--runs", str(ROOT / "tests" / "no-exported-runs")]
    result = CliRunner().invoke(app, ["study", *args, *runs, "--dry-run"], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    comments = [line[2:] for line in lines if line.startswith("# ")]
    commands = [shlex.split(line.split("#")[0]) for line in lines if not line.startswith("#")]
    return comments, commands


def _overrides(cmd: list[str]) -> dict[str, str]:
    pairs = [cmd[i + 1] for i, tok in enumerate(cmd) if tok == "-S"]
    assert all(p.startswith("++") for p in pairs), pairs  # ++ sets keys the lean params.yaml lacks
    return dict(p[2:].split("=", 1) for p in pairs)


def _configs(runs: list[list[str]]):
    """The validated params of each dry-run command, as DVC would write them."""
    plan = [study.PlannedExp(c[5], _overrides(c)) for c in runs]
    return dict(zip((p.name for p in plan), study.planned_configs(plan, PARAMS)))


def test_ablations_dry_run_commands() -> None:
    _, lines = _dry("ablations", "--seeds", "2", "--jobs", "3")
    runs = [c for c in lines if c[:3] == ["dvc", "exp", "run"]]
    assert len(runs) == 6 * 2
    assert all(c[3] == "--queue" and c[4] == "--name" for c in runs)
    names = [c[5] for c in runs]
    assert len(set(names)) == len(names) and "abl-mamo-s0" in names and "abl-denoise-text025-s1" in names
    cfgs = _configs(runs)  # every -S key exists in the schema and validates
    assert cfgs["abl-mamo-s1"].objective.variant == "mamo" and cfgs["abl-mamo-s1"].seed == 1
    assert cfgs["abl-denoise-pixel-s0"].objective.mim_target == "pixel"
    assert cfgs["abl-denoise-no-vicreg-s0"].objective.vicreg is False
    assert cfgs["abl-denoise-no-vicreg-s0"].pretrain.steps == load_config(PARAMS).pretrain.steps  # rest kept
    assert cfgs["abl-denoise-no-itc-s1"].objective.itc is False
    assert cfgs["abl-denoise-text025-s0"].objective.text_mask_ratio == 0.25
    assert cfgs["abl-denoise-hog-s0"].objective.variant == "denoising"
    assert {cfg.seed for cfg in cfgs.values()} == {0, 1}
    assert lines[len(runs)] == ["dvc", "queue", "start", "-j", "3"]
    assert lines[len(runs) + 1][:3] == ["dvc", "queue", "status"]
    assert lines[-1][:2] == ["dmp", "report"]


def test_seeds_dry_run_runs_both_variants_with_every_seed() -> None:
    _, lines = _dry("seeds", "--seeds", "3")
    cfgs = _configs([c for c in lines if c[:3] == ["dvc", "exp", "run"]])
    assert {(c.objective.variant, c.seed) for c in cfgs.values()} == {
        (v, s) for v in ("mamo", "denoising") for s in (0, 1, 2)}
    assert cfgs["seed-mamo-s2"].pretrain.steps == load_config(PARAMS).pretrain.steps  # the rest from params.yaml
    # after `make run` (seed 0 of both variants), only the other seeds
    _, lines = _dry("seeds", "--seeds", "3", "--first-seed", "1")
    names = [c[5] for c in lines if c[:3] == ["dvc", "exp", "run"]]
    assert sorted(names) == ["seed-denoising-s1", "seed-denoising-s2", "seed-mamo-s1", "seed-mamo-s2"]


def test_scaling_dry_run_chooses_fractions_variants_seeds() -> None:
    policy, lines = _dry("scaling", "--axis", "data", "--seeds", "2", "--fractions", "0.2,0.6",
                         "--variants", "denoising")
    runs = [c for c in lines if c[:3] == ["dvc", "exp", "run"]]
    cfgs = _configs(runs)
    assert {(c.objective.variant, c.data.fraction, c.pretrain.data_fraction, c.seed) for c in cfgs.values()} == {
        ("denoising", f, 1.0, s) for f in (0.2, 0.6) for s in (0, 1)}
    assert "scale-denoising-f060-s1" in cfgs
    assert policy[0].startswith("budget: equal optimiser steps at every data.fraction")
    assert policy[1].startswith("axis: data.fraction: pretraining and finetuning both see")
    # the default: the pretraining-data axis, both variants, four fractions
    _, lines = _dry("scaling")
    cfgs = _configs([c for c in lines if c[:3] == ["dvc", "exp", "run"]])
    assert {(c.objective.variant, c.pretrain.data_fraction, c.data.fraction) for c in cfgs.values()} == {
        (v, f, 1.0) for v in ("mamo", "denoising") for f in (0.1, 0.25, 0.5, 1.0)}


def test_scaling_pretrain_axis_varies_what_pretraining_sees() -> None:
    """The seed paper's axis: pretrain.data_fraction (pretraining sees the nested share, finetuning
    every image) with the same equal-steps overrides as data.fraction, and names of its own."""
    base = load_config(PARAMS)
    policy, lines = _dry("scaling", "--axis", "pretrain", "--seeds", "2", "--fractions", "0.25,1",
                         "--variants", "denoising,mamo")
    runs = [c for c in lines if c[:3] == ["dvc", "exp", "run"]]
    assert sorted(c[5] for c in runs) == sorted(f"pts-{v}-f{f}-s{s}" for v in ("denoising", "mamo")
                                                for f in ("025", "100") for s in (0, 1))
    assert _overrides(runs[0]) == {"objective.variant": "denoising", "pretrain.data_fraction": "0.25",
                                   "pretrain.steps": str(base.pretrain.steps), "pretrain.epochs": "null",
                                   "finetune.steps": str(base.finetune.steps), "finetune.epochs": "null", "seed": "0"}
    cfgs = _configs(runs)
    assert cfgs["pts-mamo-f025-s1"].pretrain.data_fraction == 0.25 and cfgs["pts-mamo-f025-s1"].data.fraction == 1.0
    assert cfgs["pts-mamo-f025-s1"].objective.variant == "mamo" and cfgs["pts-mamo-f025-s1"].seed == 1
    assert policy[0].startswith("budget: equal optimiser steps at every pretrain.data_fraction")
    assert "pretraining sees that nested share" in policy[1]
    assert "finetuning and the re-ranker's refit see all" in policy[1]
    # 8000 training images; pretraining on ceil(0.25 x 8000) of them, finetuning on all (full batches of 32)
    steps, ft = base.pretrain.steps, base.finetune.steps
    assert (f"pretrain.data_fraction 0.25: 8000 training images; pretrain {steps} steps on 2000 images = "
            f"{steps / (2000 // 32):.1f} epochs, finetune {ft} steps on 8000 images = {ft / (8000 // 32):.1f} epochs"
            in [line.strip() for line in policy]), policy
    # frozen is a variant the plan takes (it needs a preset with pretrained towers to validate)
    plan = study.scaling_plan(1, [0.5], study.parse_variants("denoising,mamo,frozen"), base=base)
    assert [p.name for p in plan] == ["pts-denoising-f050-s0", "pts-mamo-f050-s0", "pts-frozen-f050-s0"]
    assert all("data.fraction" not in p.overrides for p in plan)
    assert [p.name for p in study.scaling_plan(1, [0.5], ["mamo"], base=base, axis="data")] == ["scale-mamo-f050-s0"]


def test_scaling_trains_equal_steps_at_every_fraction() -> None:
    """The default budget: every fraction trains params.yaml's step counts, epochs unset,
    so a smaller fraction sees its images more often (data varies, compute does not)."""
    base = load_config(PARAMS)
    plan = study.scaling_plan(1, [0.1, 0.25, 0.5, 1.0], ["mamo", "denoising"], base=base, axis="data")
    cfgs = study.planned_configs(plan, PARAMS)
    assert sorted({c.data.fraction for c in cfgs}) == [0.1, 0.25, 0.5, 1.0]
    for stage in ("pretrain", "finetune"):
        assert {getattr(c, stage).steps for c in cfgs} == {getattr(base, stage).steps}
        assert {getattr(c, stage).epochs for c in cfgs} == {None}
    lines = study.budget_lines("steps", cfgs, axis="data")
    # S steps of 32 pairs: 32 S / 800 passes over the 800 images of fraction 0.1, 32 S / 8000 over 8000
    steps = base.pretrain.steps
    assert any(line.strip().startswith(f"fraction 0.1: 800 training images; pretrain {steps} steps = "
                                       f"{steps * 32 / 800:.1f} epochs") for line in lines), lines
    assert any(f"fraction 1: 8000 training images; pretrain {steps} steps = {steps * 32 / 8000:.1f} epochs" in line
               for line in lines), lines


def test_scaling_equal_epochs_is_an_explicit_choice(tmp_path) -> None:
    base = load_config(PARAMS)
    plan = study.scaling_plan(1, [0.25, 1.0], ["denoising"], budget="epochs", base=base, epochs=3, axis="data")
    assert all("-ep3-" in p.name for p in plan)
    cfgs = study.planned_configs(plan, PARAMS)
    for stage in ("pretrain", "finetune"):
        assert {getattr(c, stage).epochs for c in cfgs} == {3}
        assert {getattr(c, stage).steps for c in cfgs} == {None}
    lines = study.budget_lines("epochs", cfgs, axis="data")
    assert lines[0].startswith("budget: equal epochs")
    assert any("fraction 0.25: 2000 training images; pretrain 186 steps = 3.0 epochs" in line for line in lines), lines

    # a params file that sets epochs instead of steps cannot give an equal-steps study
    from dvc.utils.hydra import apply_overrides

    by_epochs = tmp_path / "params.yaml"
    by_epochs.write_text(PARAMS.read_text())
    apply_overrides(by_epochs, ["pretrain.steps=null", "++pretrain.epochs=2"])
    with pytest.raises(ParamsError, match=r"pretrain\.steps"):
        study.scaling_plan(1, [0.5], ["mamo"], base=load_config(by_epochs))


def test_bad_study_options_fail_with_one_line() -> None:
    for args, needle in ((["--fractions", "0,0.5"], "--fractions"), (["--fractions", "a,b"], "--fractions"),
                         (["--variants", "mamo,simclr"], "simclr"), (["--budget", "flops"], "--budget"),
                         (["--axis", "epochs"], "--axis")):
        result = CliRunner().invoke(app, ["study", "scaling", *args, "--dry-run"])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output


def test_plan_check_names_the_experiment_and_key() -> None:
    plan = [study.PlannedExp("abl-typo-s0", {"objective.vicerg": "false"})]
    with pytest.raises(ParamsError, match=r"abl-typo-s0.*objective\.vicerg"):
        study.planned_configs(plan, PARAMS)


def test_queue_states_parse_dvc_queue_status() -> None:
    out = """Task     Name               Created    Status
3bb1f3e  abl-mamo-s0        10:00 AM   Success
a1c2e3f  abl-mamo-s1        10:00 AM   Running
9f9f9f9  abl-mamo-s10       10:01 AM   Queued

Worker status: 1 active, 0 idle
"""
    assert study.queue_states(out, ["abl-mamo-s0", "abl-mamo-s1", "abl-mamo-s10", "absent"]) == {
        "abl-mamo-s0": "success", "abl-mamo-s1": "running", "abl-mamo-s10": "queued"}
    assert study.queue_tasks(out) == {"3bb1f3e", "a1c2e3f", "9f9f9f9"}
    # an earlier study's task of the same name, listed after ours, is not read as ours
    later = out.replace("\n\n", "\n5e5e5e5  abl-mamo-s1        09:00 AM   Success\n\n")
    assert study.queue_states(later, ["abl-mamo-s1"], skip=frozenset({"5e5e5e5"})) == {"abl-mamo-s1": "running"}


def _fake_dvc(monkeypatch, plan, existing=(), untracked=(), states=("queued", "running", "success"), dead=0,
              status_failures=(), outcome=None, pending=()):
    """A stand-in for subprocess.run: records the dvc calls and plays a queue whose tasks go
    through ``states`` (one per poll) and whose first ``dead`` polls list no live worker; git
    status reports ``untracked`` files. ``status_failures``: for each ``dvc queue status``
    call in order, True makes it fail the way DVC does on the pidbox race. ``outcome``: name ->
    the state that name's task ends in instead of success. ``pending``: names whose earlier
    task (an interrupted invocation's) is still in the queue, going through ``states``."""
    outcome = outcome or {}
    calls: list[list[str]] = []
    polls = iter(states)
    dead_polls = iter([True] * dead)
    failures = iter(status_failures)
    def fake_run(cmd, **kwargs):
        if cmd[:2] == ["git", "status"]:
            return subprocess.CompletedProcess(cmd, 0, "".join(f"?? {p}\0" for p in untracked), "")
        if cmd[:2] == ["git", "show"]:  # HEAD's params.yaml: the same as the workspace's
            return subprocess.CompletedProcess(cmd, 0, PARAMS.read_text(), "")
        calls.append(cmd[2:])  # drop "<python> -m"
        out = ""
        if cmd[3:5] == ["queue", "status"] and next(failures, False):
            return subprocess.CompletedProcess(cmd, 255, "Task  Name  Created  Status\n", (
                "ERROR: unexpected error - Extra data: line 1 column 850 (char 849)\n\n"
                "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!\n"))
        if cmd[3:5] == ["queue", "status"]:  # an earlier study's task of each name stays listed
            header = "Task     Name    Created    Status\n"
            queued = any(c[1:3] == ["exp", "run"] for c in calls)
            state = next(polls, "success") if queued or pending else "success"

            def shown(name):
                return (outcome.get(name, state) if state == "success" else state).capitalize()

            earlier = "".join(
                f"old{i:03d}  {exp.name}  09:00 AM  {shown(exp.name) if exp.name in pending else 'Success'}\n"
                for i, exp in enumerate(plan))
            ours = "".join(f"abc{i:03d}  {exp.name}  10:00 AM  {shown(exp.name)}\n"
                           for i, exp in enumerate(plan)) if queued else ""
            alive = 0 if queued and next(dead_polls, False) else 1
            out = header + ours + earlier + f"\nWorker status: {alive} active, 0 idle\n"

        if cmd[3:5] == ["exp", "list"]:
            out = "\n".join(existing) + "\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    return calls


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text())
    return path


def test_run_study_queues_waits_and_reports(monkeypatch, params) -> None:
    """The real flow with a stand-in for dvc: queued, started, polled until done, reported."""
    plan = study.ablation_plan(1)[:2]
    calls = _fake_dvc(monkeypatch, plan)
    server = ClusterSettings(tracking_uri="http://127.0.0.1:5000")  # two workers need a tracking server
    study.run_study(plan, jobs=2, dry_run=False, params=params, poll_s=0, cluster=server)

    assert calls[0] == ["dvc", "exp", "list", "--name-only"]
    assert calls[1] == ["dvc", "queue", "status"]  # the tasks listed before this study's own
    assert calls[2] == ["dvc", "exp", "run", "--queue", "--name", "abl-mamo-s0",
                        "-S", "++objective.variant=mamo", "-S", "++seed=0"]
    assert calls[4] == ["dvc", "queue", "start", "-j", "2"]
    # polled until this study's tasks finish: the earlier study's "Success" rows are not theirs
    assert [c[1:3] for c in calls[5:8]] == [["queue", "status"]] * 3
    assert calls[8] == ["stages", "report", "--params", str(params)]
    assert len(calls) == 9


def test_a_failing_status_poll_is_tried_again_then_named(monkeypatch, params, capsys) -> None:
    """`dvc queue status` fails now and then while two workers run (treeverse/dvc-task 73): the
    study polls again; only STATUS_RETRIES + 1 failures in a row stop it, with DVC's own error
    line, not its support boilerplate."""
    plan = study.ablation_plan(1)[:1]
    calls = _fake_dvc(monkeypatch, plan, status_failures=[False, True, True, False, True])
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    assert calls[-1][:2] == ["stages", "report"]
    err = capsys.readouterr().err
    assert err.count("Extra data: line 1 column 850") == 3 and "Having any troubles" not in err

    _fake_dvc(monkeypatch, plan, status_failures=[False] + [True] * (study.STATUS_RETRIES + 1))
    with pytest.raises(study.StudyFailed, match=r"queue status` failed \(255\): ERROR: unexpected error - Extra "
                                                r"data.* \(6 polls in a row\)"):
        study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)


def test_stopped_queue_workers_are_started_again_and_then_given_up(monkeypatch, params, capsys) -> None:
    """DVC's workers can stop with tasks still queued (iterative/dvc 10562): the study starts them
    again after two polls without a live worker, a bounded number of times."""
    plan = study.ablation_plan(1)[:1]
    calls = _fake_dvc(monkeypatch, plan, states=["queued"] * 4 + ["running", "success"], dead=3)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    starts = [c for c in calls if c[1:3] == ["queue", "start"]]
    assert len(starts) == 2  # the first start, one restart (dead polls 1-2), poll 3 alone is not enough
    assert "no queue worker is alive and 1 experiments wait" in capsys.readouterr().err

    calls = _fake_dvc(monkeypatch, plan, states=["queued"] * 100, dead=100)
    with pytest.raises(study.StudyFailed, match=r"queue workers stopped 4 times with 1 experiments waiting"):
        study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    assert sum(c[1:3] == ["queue", "start"] for c in calls) == 1 + study.WORKER_RESTARTS


def test_running_tasks_without_a_live_worker_are_not_waited_for(monkeypatch, params, capsys) -> None:
    """A killed queue worker leaves its task "Running" for ever (seen with DVC 3.67: nothing
    collects it, and a new worker does not take it up): the study reports without it."""
    plan = study.ablation_plan(1)[:1]
    calls = _fake_dvc(monkeypatch, plan, states=["running"] * 100, dead=100)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    assert sum(c[1:3] == ["queue", "status"] for c in calls) == 1 + 2  # before queueing, then two dead polls
    assert calls[-1][:2] == ["stages", "report"]
    err = capsys.readouterr().err
    assert "1 experiments are marked running but no queue worker is alive" in err and "1 failed" in err


def test_two_workers_on_one_sqlite_store_are_refused(monkeypatch, params) -> None:
    plan = study.ablation_plan(1)[:2]
    calls = _fake_dvc(monkeypatch, plan)
    with pytest.raises(study.StudyFailed, match=r"2 workers would write to one SQLite MLflow store .*mlflow server"):
        study.run_study(plan, jobs=2, dry_run=False, params=params, poll_s=0)
    assert not any(c[:2] == ["dvc", "exp"] or c[:2] == ["dvc", "queue"] for c in calls)  # nothing queued
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)  # one writer is fine


def test_one_queue_worker_per_gpu_each_started_with_its_gpu(monkeypatch, params) -> None:
    """DVC workers inherit the environment of the `dvc queue start` that launched them."""
    plan = study.ablation_plan(1)[:4]
    seen: list[tuple[list[str], dict]] = []
    calls = _fake_dvc(monkeypatch, plan)
    fake = study.subprocess.run

    def spy(cmd, **kwargs):
        seen.append((cmd, kwargs.get("env") or {}))
        return fake(cmd, **kwargs)

    monkeypatch.setattr(study.subprocess, "run", spy)
    gpus = ClusterSettings(gpus=["0", "1"], tracking_uri="http://127.0.0.1:5000")
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, cluster=gpus)
    starts = [(cmd, env) for cmd, env in seen if "_spawn_worker" in " ".join(cmd)]
    assert [cmd[-1] for cmd, _ in starts] == [study.SPAWN_WORKER.format(num=k) for k in (1, 2)]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in starts] == ["0", "1"]
    assert all(env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" for _, env in starts)
    assert sum(c[1:3] == ["exp", "run"] for c in calls) == 4


def test_run_study_copies_untracked_sources(monkeypatch, params) -> None:
    """DVC builds queued experiments from git-tracked files only: new code goes in with -C,
    untracked pipeline outputs do not."""
    plan = study.ablation_plan(1)[:1]
    calls = _fake_dvc(monkeypatch, plan, untracked=["stages/new_stage.py", "reports/results.md", "dvc.lock"])
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    queued = [c for c in calls if c[1:4] == ["exp", "run", "--queue"]]
    assert len(queued) == 1 and queued[0][-2:] == ["-C", "stages/new_stage.py"]
    assert queued[0].count("-C") == 1


def test_run_study_keeps_existing_experiments_unless_rerun(monkeypatch, params) -> None:
    plan = study.ablation_plan(1)[:2]
    calls = _fake_dvc(monkeypatch, plan[1:], existing=[plan[0].name])
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0)
    queued = [c[5] for c in calls if c[1:4] == ["exp", "run", "--queue"]]
    assert queued == [plan[1].name]
    assert not any(c[1:3] == ["exp", "remove"] for c in calls)

    calls = _fake_dvc(monkeypatch, plan, existing=[plan[0].name])
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, rerun=True)
    assert ["dvc", "exp", "remove", plan[0].name] in calls
    assert [c[5] for c in calls if c[1:4] == ["exp", "run", "--queue"]] == [p.name for p in plan]


def test_study_help() -> None:
    result = CliRunner().invoke(app, ["study", "--help"])
    assert result.exit_code == 0 and "ablations" in result.output and "scaling" in result.output
    for name in ("ablations", "scaling"):
        result = CliRunner().invoke(app, ["study", name, "--help"])
        assert result.exit_code == 0 and "--seeds" in result.output and "--dry-run" in result.output
    result = CliRunner().invoke(app, ["study", "scaling", "--help"])
    assert "--fractions" in result.output and "--variants" in result.output and "--budget" in result.output



def test_gpus_per_experiment_group_the_ids_and_run_torchrun() -> None:
    starts = study.worker_starts(1, ["0", "1", "2", "3"], "http://h:5000", gpus_per_exp=2)
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in starts] == ["0,1", "2,3"]
    assert all(env["DMP_NPROC_PER_NODE"] == "2" for env, _ in starts)
    assert "DMP_NPROC_PER_NODE" not in study.worker_starts(1, ["0", "1"])[0][0]
    with pytest.raises(study.StudyFailed, match="not a multiple of --gpus-per-exp 2"):
        study.worker_starts(1, ["0", "1", "2"], gpus_per_exp=2)


def test_a_training_stage_relaunches_itself_under_torchrun(monkeypatch) -> None:
    from stages import _common

    execs = []
    monkeypatch.setattr(_common.os, "execv", lambda exe, argv: execs.append(argv))
    monkeypatch.setattr(_common.sys, "argv", ["dmp", "pretrain", "--params", "p.yaml"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("DMP_NPROC_PER_NODE", "1")
    _common.relaunch_under_torchrun()
    assert execs == []  # one process: nothing to do
    monkeypatch.setenv("DMP_NPROC_PER_NODE", "2")
    _common.relaunch_under_torchrun()
    assert execs[0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "stages",
                            "pretrain", "--params", "p.yaml"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already under torchrun: never again
    _common.relaunch_under_torchrun()
    assert len(execs) == 1


# ------------------------------------------------------------------ resuming from exported runs, exporting
def _export(runs: Path, name: str, params_text: str, *, metrics: bool = True, source: dict | None = None) -> None:
    """An exported run folder as orchestration/export.py writes it (params.yaml + evaluate metrics)."""
    (runs / name / "reports/evaluate").mkdir(parents=True)
    (runs / name / "params.yaml").write_text(params_text)
    if metrics:
        (runs / name / "reports/evaluate/metrics.json").write_text('{"finetune.r_mean": 50.0}')
    if source is not None:
        (runs / name / "source.json").write_text(json.dumps(source))


def _with(*overrides: str) -> str:
    """params.yaml's text with ``overrides`` applied by DVC's -S writer."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(PARAMS.read_text())
        apply_overrides(path, list(overrides))
        return path.read_text()


def test_plan_skips_a_run_exported_under_another_name_with_the_same_params_and_seed(tmp_path) -> None:
    """``seed-denoising-s0`` (no pretrain.data_fraction key: the default 1.0) is the planned
    ``pts-denoising-f100-s0``; another fraction, another seed, an unfinished folder are not."""
    runs = tmp_path / "runs"
    _export(runs, "seed-denoising-s0", PARAMS.read_text(), source={"baseline": "ab" * 20, "commit": "cd" * 20})
    _export(runs, "half-s1", _with("++pretrain.data_fraction=0.5", "seed=1"))  # made elsewhere, another name
    _export(runs, "unfinished", _with("++pretrain.data_fraction=0.5"), metrics=False)  # no evaluation: not finished
    _export(runs, "pts-mamo-f100-s0", _with("objective.variant=mamo", "model.preset=minilm"))  # name clash
    base = load_config(PARAMS)
    plan = study.scaling_plan(2, [0.5, 1.0], ["denoising", "mamo"], base=base)
    todo, lines = study.skip_finished(plan, study.planned_configs(plan, PARAMS), runs)
    assert [p.name for p in plan if p not in todo] == ["pts-denoising-f050-s1", "pts-denoising-f100-s0"]
    assert (f"skip pts-denoising-f100-s0: finished as {runs}/seed-denoising-s0 (same method params and seed, "
            f"made on commit abababa)") in lines
    assert f"skip pts-denoising-f050-s1: finished as {runs}/half-s1 (same method params and seed, commit not " \
           f"recorded: no source.json)" in lines
    assert any(line.startswith(f"note: {runs}/pts-mamo-f100-s0 holds a run with other params (model.preset='minilm'")
               for line in lines), lines
    assert lines[-1] == "6 of 8 planned runs remain: " + ", ".join(p.name for p in todo)
    # the data axis at 1.0 is the same run too; at 0.5 it is not (the whole pipeline on half the data)
    plan = study.scaling_plan(1, [0.5, 1.0], ["denoising"], base=base, axis="data")
    todo, _ = study.skip_finished(plan, study.planned_configs(plan, PARAMS), runs)
    assert [p.name for p in todo] == ["scale-denoising-f050-s0"]
    # an absent folder: nothing finished
    todo, lines = study.skip_finished(plan, study.planned_configs(plan, PARAMS), tmp_path / "absent")
    assert todo == plan and lines == ["2 of 2 planned runs remain: scale-denoising-f050-s0, scale-denoising-f100-s0"]


def test_seeds_dry_run_names_the_skipped_and_the_remaining_runs(tmp_path) -> None:
    runs = tmp_path / "runs"
    _export(runs, "denoising-default", PARAMS.read_text())
    comments, lines = _dry("seeds", "--seeds", "2", "--variants", "denoising", "--runs", str(runs))
    assert [c[5] for c in lines if c[:3] == ["dvc", "exp", "run"]] == ["seed-denoising-s1"]
    assert comments == [f"skip seed-denoising-s0: finished as {runs}/denoising-default (same method params and seed, "
                        "commit not recorded: no source.json)", "1 of 2 planned runs remain: seed-denoising-s1"]
    _, lines = _dry("seeds", "--seeds", "2", "--variants", "denoising", "--runs", str(runs), "--rerun")
    assert [c[5] for c in lines if c[:3] == ["dvc", "exp", "run"]] == ["seed-denoising-s0", "seed-denoising-s1"]


def _fake_export(monkeypatch, runs: Path, plan) -> list[str]:
    """export_experiment recording the names it is asked for, writing each one's finished folder."""
    asked: list[str] = []
    overrides = {exp.name: exp.set_params() for exp in plan}

    def export(out, name, rev=None, *, baseline="HEAD", cwd=None):
        asked.append(name)
        assert out == runs and baseline == "b" * 40
        _export(out, name, _with(*overrides[name]))
        return out / name

    monkeypatch.setattr(study, "export_experiment", export)
    monkeypatch.setattr(study, "head_sha", lambda cwd=None: "b" * 40)
    return asked


def test_run_study_exports_each_success_at_once_and_no_failure(monkeypatch, params, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    _export(runs, "denoising-default", PARAMS.read_text())  # seed-denoising-s0: finished, not run again
    plan = study.seeds_plan(2, ["denoising", "mamo"])
    calls = _fake_dvc(monkeypatch, plan, outcome={"seed-mamo-s1": "failed"})
    asked = _fake_export(monkeypatch, runs, plan)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert [c[5] for c in calls if c[1:4] == ["exp", "run", "--queue"]] == [
        "seed-denoising-s1", "seed-mamo-s0", "seed-mamo-s1"]
    assert asked == ["seed-denoising-s1", "seed-mamo-s0"]  # once each, as they finished; the failure never
    err = capsys.readouterr().err
    assert "study: skip seed-denoising-s0: finished as" in err and "3 of 4 planned runs remain" in err
    assert f"study: exported seed-mamo-s0 to {runs}/seed-mamo-s0" in err
    assert "1 failed (seed-mamo-s1); see `dvc queue logs <name>`; not exported" in err
    assert (f"2 runs exported to {runs} (seed-denoising-s1, seed-mamo-s0); keep them:\n  git add {runs} && git "
            f"commit -m 'study seeds: 2 runs exported to {runs}'") in err
    # the same command again (e.g. in another clone with the exports): only the failed run
    calls = _fake_dvc(monkeypatch, plan)
    asked.clear()
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert [c[5] for c in calls if c[1:4] == ["exp", "run", "--queue"]] == ["seed-mamo-s1"] == asked
    assert "1 of 4 planned runs remain: seed-mamo-s1" in capsys.readouterr().err
    # and once more: nothing to run, nothing queued, nothing exported; the report all the same
    calls = _fake_dvc(monkeypatch, plan)
    asked.clear()
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert [c for c in calls if c[:1] == ["dvc"]] == []
    assert calls[-1] == ["stages", "report", "--params", str(params), "--runs", str(runs)]  # the exports reported
    assert asked == [] and "0 of 4 planned runs remain: every one is finished in" in capsys.readouterr().err


def test_run_study_records_its_plan_before_queueing_merged_by_name(monkeypatch, params, tmp_path, capsys) -> None:
    """runs/plan.json: every planned experiment (name, overrides), written before anything is queued,
    also when every one is finished; a later invocation adds its names and replaces the same name;
    a dry run writes nothing."""
    runs = tmp_path / "runs"
    plan_json = runs / "plan.json"
    plan = study.seeds_plan(2, ["denoising"])
    study.run_study(plan, jobs=1, dry_run=True, params=params, poll_s=0, runs=runs)
    assert not plan_json.exists() and not runs.exists()

    calls = _fake_dvc(monkeypatch, plan)
    fake, seen = study.subprocess.run, []

    def spy(cmd, **kwargs):  # whether the plan is there when each experiment is queued
        if "--queue" in cmd:
            seen.append(plan_json.is_file())
        return fake(cmd, **kwargs)

    monkeypatch.setattr(study.subprocess, "run", spy)
    _fake_export(monkeypatch, runs, plan)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert seen == [True, True] and len([c for c in calls if "--queue" in c]) == 2
    text = plan_json.read_text()
    assert json.loads(text) == [
        {"name": "seed-denoising-s0", "params": {"objective.variant": "denoising", "seed": "0"}},
        {"name": "seed-denoising-s1", "params": {"objective.variant": "denoising", "seed": "1"}}]
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert f"the plan (2 runs) is recorded in {plan_json}" in capsys.readouterr().err

    # every planned run is finished: nothing queued, the plan recorded all the same
    plan_json.unlink()
    calls = _fake_dvc(monkeypatch, plan)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert [c for c in calls if c[:1] == ["dvc"]] == [] and plan_json.read_text() == text

    # another invocation: its names are added, the same name replaced, the rest kept; sorted by name
    other = [study.PlannedExp("seed-denoising-s1", {"objective.variant": "denoising", "objective.vicreg": "false",
                                                    "seed": "1"}),
             *study.scaling_plan(1, [0.5], ["mamo"], base=load_config(params))]
    _fake_dvc(monkeypatch, other)
    monkeypatch.setattr(study, "export_experiment", lambda *args, **kwargs: None)  # exports nothing this time
    study.run_study(other, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="scaling")
    entries = json.loads(plan_json.read_text())
    assert [e["name"] for e in entries] == ["pts-mamo-f050-s0", "seed-denoising-s0", "seed-denoising-s1"]
    assert entries[0]["params"] == other[1].overrides and entries[0]["params"]["pretrain.data_fraction"] == "0.5"
    assert entries[2]["params"] == {"objective.variant": "denoising", "objective.vicreg": "false", "seed": "1"}
    before = plan_json.read_bytes()
    study.run_study(other, jobs=1, dry_run=True, params=params, poll_s=0, runs=runs)  # a dry run changes nothing
    assert plan_json.read_bytes() == before

    plan_json.write_text("<<<<<<< HEAD\n")  # a merge conflict: refused, named, not overwritten
    with pytest.raises(study.StudyFailed, match=r"plan\.json is not a readable plan"):
        study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs)
    assert plan_json.read_text() == "<<<<<<< HEAD\n"


def test_an_interrupted_study_names_its_exports_and_how_to_go_on(monkeypatch, params, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    plan = study.seeds_plan(2, ["denoising"])
    _fake_dvc(monkeypatch, plan, states=["success"], outcome={"seed-denoising-s1": "running"})
    asked = _fake_export(monkeypatch, runs, plan)

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(study.time, "sleep", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs, kind="seeds")
    assert asked == ["seed-denoising-s0"]
    err = capsys.readouterr().err
    assert "study: interrupted. The queue workers go on" in err and "Run the same command again" in err
    assert f"1 runs exported to {runs} (seed-denoising-s0); keep them:\n  git add {runs} && git commit" in err


def test_a_task_still_in_the_queue_from_an_earlier_invocation_is_waited_for_not_queued_again(
        monkeypatch, params, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    plan = study.seeds_plan(2, ["denoising"])
    calls = _fake_dvc(monkeypatch, plan, states=["running", "running", "success"], pending=["seed-denoising-s0"])
    asked = _fake_export(monkeypatch, runs, plan)
    study.run_study(plan, jobs=1, dry_run=False, params=params, poll_s=0, runs=runs)
    assert [c[5] for c in calls if c[1:4] == ["exp", "run", "--queue"]] == ["seed-denoising-s1"]
    assert sorted(asked) == ["seed-denoising-s0", "seed-denoising-s1"]
    assert "seed-denoising-s0 is in the queue already (task old000" in capsys.readouterr().err


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(list(args), cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_export_one_experiment_writes_its_files_and_its_commits(tmp_path, monkeypatch) -> None:
    """A real DVC experiment commit (``dvc exp save``): its numbers, params and a source.json of
    commit shas only, the same bytes every time; a name without a commit (failed) writes nothing."""
    from orchestration.export import export_experiment, finished_runs

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    _git(repo, "git", "init", "-q")
    _git(repo, *dvc, "init", "-q")
    (repo / "params.yaml").write_text(PARAMS.read_text())
    _git(repo, "git", "add", "-A")
    _git(repo, "git", "commit", "-qm", "baseline")
    base = _git(repo, "git", "rev-parse", "HEAD")
    (repo / "params.yaml").write_text(_with("++pretrain.data_fraction=0.5"))
    (repo / "reports/evaluate").mkdir(parents=True)
    (repo / "reports/evaluate/metrics.json").write_text('{"finetune.r_mean": 40.0}')
    (repo / "reports/evaluate/scores.npz").write_bytes(b"never exported")
    _git(repo, *dvc, "exp", "save", "-n", "pts-denoising-f050-s0", "-I", "reports/evaluate/metrics.json",
         "-I", "reports/evaluate/scores.npz")
    sha = _git(repo, "git", "rev-parse", f"refs/exps/{base[:2]}/{base[2:]}/pts-denoising-f050-s0")
    monkeypatch.chdir(repo)

    out = tmp_path / "runs"
    (out / "pts-denoising-f050-s0/reports/evaluate").mkdir(parents=True)
    (out / "pts-denoising-f050-s0/reports/evaluate/ranks.npz").write_bytes(b"another run of the name")
    assert export_experiment(out, "pts-denoising-f050-s0", baseline=base) == out / "pts-denoising-f050-s0"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["pts-denoising-f050-s0/params.yaml", "pts-denoising-f050-s0/reports/evaluate/metrics.json",
                     "pts-denoising-f050-s0/source.json"]
    assert json.loads((out / "pts-denoising-f050-s0/source.json").read_text()) == {
        "experiment": "pts-denoising-f050-s0", "commit": sha, "baseline": base}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert export_experiment(out, "pts-denoising-f050-s0", sha) == out / "pts-denoising-f050-s0"  # by rev
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # deterministic
    [run] = finished_runs(out)
    assert run.name == "pts-denoising-f050-s0" and run.params["pretrain.data_fraction"] == 0.5

    assert export_experiment(out, "pts-mamo-f050-s0", baseline=base) is None  # failed: no experiment commit
    assert not (out / "pts-mamo-f050-s0").exists()
