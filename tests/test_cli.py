"""The `dmp` command: every subcommand has --help, and bad params fail with one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from dmp_core.config import Config, load_config
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["check", "download", "preprocess", "targets", "pretrain", "finetune", "evaluate", "report"]


def _command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix + (c.name or c.callback.__name__,) for c in group.registered_commands]
    for sub in group.registered_groups:
        paths += _command_paths(sub.typer_instance, prefix + (sub.name,))
    return paths


def test_every_stage_is_a_command() -> None:
    names = {p[0] for p in _command_paths(app)}
    assert set(STAGES) <= names, names
    assert {"bench", "model", "study", "pipeline", "params"} <= names


@pytest.mark.parametrize("path", _command_paths(app), ids=lambda p: " ".join(p))
def test_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_default_params_file_is_valid() -> None:
    # params.yaml is lean (tests/test_params.py: every key it lists is a schema key at its default)
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == Config.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))


BAD_VALUES = [
    ("objective", "vicerg", False, "objective.vicerg"),
    ("data", "fraction", 1.5, "data.fraction"),
    ("data", "on_bad_item", "ignore", "data.on_bad_item"),
    ("targets", "hog", {"grad": "prewitt"}, "targets.hog.grad"),
]


# one bad value per stage (a subprocess each: the real entry point, real stderr)
@pytest.mark.parametrize(
    "stage,section,key,value,needle",
    [(stage, *BAD_VALUES[i % len(BAD_VALUES)]) for i, stage in enumerate(STAGES)],
    ids=STAGES,
)
def test_bad_params_fail_with_one_line(tmp_path: Path, stage: str, section: str, key: str, value, needle: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "stages", stage, "--params", str(bad)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and str(bad) in lines[0]


# ------------------------------------------------------------------ dmp pipeline's bookkeeping
def test_pipeline_tree_report_and_baseline_check(tmp_path, monkeypatch) -> None:
    """In a real git repository: which changed files `dmp pipeline` says to commit as the
    baseline, and whether params.yaml is HEAD's (only then is '<variant>-default' saved)."""
    from orchestration import pipeline, repo

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.invalid",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.invalid"})

    shutil.copyfile(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "pretrain.py").write_text("# stage\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "project")
    monkeypatch.chdir(tmp_path)
    outputs = repo.pipeline_outputs()
    assert "reports/evaluate/metrics.json" in outputs and "data/params.ok" in outputs
    assert repo.code_roots() == ["dmp_core", "stages"]
    assert pipeline.tree_report(outputs, "denoising") == ["tree clean: the committed state is this run's baseline"]
    cfg = load_config(tmp_path / "params.yaml")
    assert pipeline.params_differ_from_head(Path("params.yaml"), cfg) == ([], "")

    for path in ("dvc.lock", "data/params.ok", "models/pretrain/.gitignore", "reports/evaluate/metrics.json",
                 "reports/figures/a.png", "stages/new_module.py", "notes.txt",
                 *(f"data/raw/synthetic/images/{i}.png" for i in range(10))):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x\n")
    (tmp_path / "stages" / "pretrain.py").write_text("# stage, edited\n")
    lines = pipeline.tree_report(outputs, "denoising")
    add = [line for line in lines if line.strip().startswith("git add -A -- ")]
    assert len(add) == 1
    added = set(add[0].split(" && ")[0].split()[4:])
    assert added == {"dvc.lock", "data/params.ok", "models/pretrain/.gitignore", "reports/evaluate/metrics.json",
                     "reports/figures/a.png", "stages/new_module.py", "stages/pretrain.py"}
    assert "  ?? data/raw/synthetic/images/ (10 files)" in lines and "  ?? notes.txt" in lines
    assert repo.untracked_sources() == ["stages/new_module.py"]  # copied into --temp runs with -C

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("vicreg:    ", "vicreg: false"))
    cfg = load_config(tmp_path / "params.yaml")
    assert pipeline.params_differ_from_head(Path("params.yaml"), cfg) == (["objective.vicreg"], "")
