"""``dmp study``: the queued ``dvc exp run`` command lines (dry run), and the
queue -> wait -> report flow against a stand-in for the dvc command."""
from __future__ import annotations

import copy
import shlex
import subprocess

from typer.testing import CliRunner

import stages.study as study
from conftest import TINY
from dmp_core.config import config_from_dict
from stages.cli import app


def _dry(*args: str) -> list[list[str]]:
    result = CliRunner().invoke(app, ["study", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return [shlex.split(line.split("#")[0]) for line in result.output.strip().splitlines()]


def _overrides(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, tok in enumerate(cmd) if tok == "-S")


def _apply(overrides: dict[str, str]):
    """The params an experiment would run with, validated like the stages do."""
    import yaml

    raw = copy.deepcopy(TINY)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config_from_dict(raw)


def test_ablations_dry_run_commands() -> None:
    lines = _dry("ablations", "--seeds", "2", "--jobs", "3")
    runs = [c for c in lines if c[:3] == ["dvc", "exp", "run"]]
    assert len(runs) == 6 * 2
    assert all(c[3] == "--queue" and c[4] == "--name" for c in runs)
    names = [c[5] for c in runs]
    assert len(set(names)) == len(names) and "abl-mamo-s0" in names and "abl-denoise-text025-s1" in names
    cfgs = {c[5]: _apply(_overrides(c)) for c in runs}  # every -S key exists and validates
    assert cfgs["abl-mamo-s1"].objective.variant == "mamo" and cfgs["abl-mamo-s1"].seed == 1
    assert cfgs["abl-denoise-pixel-s0"].objective.mim_target == "pixel"
    assert cfgs["abl-denoise-no-vicreg-s0"].objective.vicreg is False
    assert cfgs["abl-denoise-no-vicreg-s0"].objective.vicreg_coeffs.expander_dim == 64  # rest of the section kept
    assert cfgs["abl-denoise-no-itc-s1"].objective.itc is False
    assert cfgs["abl-denoise-text025-s0"].objective.text_mask_ratio == 0.25
    assert cfgs["abl-denoise-hog-s0"].objective.variant == "denoising"
    assert {cfg.seed for cfg in cfgs.values()} == {0, 1}
    assert lines[len(runs)] == ["dvc", "queue", "start", "-j", "3"]
    assert lines[len(runs) + 1][:3] == ["dvc", "queue", "status"]
    assert lines[-1][:2] == ["dmp", "report"]


def test_scaling_dry_run_commands() -> None:
    runs = [c for c in _dry("scaling", "--seeds", "3") if c[:3] == ["dvc", "exp", "run"]]
    settings = {(o["objective.variant"], float(o["data.fraction"]), int(o["seed"])) for o in map(_overrides, runs)}
    assert settings == {(v, f, s) for v in ("mamo", "denoising") for f in (0.1, 0.25, 0.5, 1.0) for s in range(3)}
    assert len(runs) == len(settings)
    assert "scale-mamo-f025-s2" in {c[5] for c in runs}


def test_queue_states_parse_dvc_queue_status() -> None:
    out = """Task     Name               Created    Status
3bb1f3e  abl-mamo-s0        10:00 AM   Success
a1c2e3f  abl-mamo-s1        10:00 AM   Running
9f9f9f9  abl-mamo-s10       10:01 AM   Queued

Worker status: 1 active, 0 idle
"""
    assert study.queue_states(out, ["abl-mamo-s0", "abl-mamo-s1", "abl-mamo-s10", "absent"]) == {
        "abl-mamo-s0": "success", "abl-mamo-s1": "running", "abl-mamo-s10": "queued"}


def test_run_study_queues_waits_and_reports(monkeypatch, tmp_path) -> None:
    """The real flow with a stand-in for dvc: queued, started, polled until done, reported."""
    plan = study.ablation_plan(1)[:2]
    calls: list[list[str]] = []
    polls = iter(["queued", "running", "success"])

    def fake_run(cmd, capture_output, text):
        calls.append(cmd[2:])  # drop "<python> -m"
        out = ""
        if cmd[3:5] == ["queue", "status"]:
            state = next(polls)
            out = "\n".join(f"abc123  {exp.name}  10:00 AM  {state.capitalize()}" for exp in plan)
        return subprocess.CompletedProcess(cmd, 0, out, "")

    reported = []
    monkeypatch.setattr(study.subprocess, "run", fake_run)
    monkeypatch.setattr("stages.report.write_report", lambda cfg, **kw: reported.append(kw))
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    study.run_study(plan, jobs=2, dry_run=False, params=tmp_path / "params.yaml", poll_s=0)

    assert calls[0] == ["dvc", "exp", "run", "--queue", "--name", "abl-mamo-s0", "-S", "objective.variant=mamo", "-S", "seed=0"]
    assert calls[2] == ["dvc", "queue", "start", "-j", "2"]
    assert [c[1:3] for c in calls[3:]] == [["queue", "status"]] * 3
    assert len(reported) == 1


def test_study_help() -> None:
    result = CliRunner().invoke(app, ["study", "--help"])
    assert result.exit_code == 0 and "ablations" in result.output and "scaling" in result.output
    for name in ("ablations", "scaling"):
        result = CliRunner().invoke(app, ["study", name, "--help"])
        assert result.exit_code == 0 and "--seeds" in result.output and "--dry-run" in result.output
