"""The `dmp` command: every subcommand has --help, and bad params fail with one line."""
from __future__ import annotations

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
STAGES = ["download", "preprocess", "targets", "pretrain", "finetune", "evaluate", "report"]


def _command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix + (c.name or c.callback.__name__,) for c in group.registered_commands]
    for sub in group.registered_groups:
        paths += _command_paths(sub.typer_instance, prefix + (sub.name,))
    return paths


def test_every_stage_is_a_command() -> None:
    names = {p[0] for p in _command_paths(app)}
    assert set(STAGES) <= names, names
    assert {"bench", "model", "study", "pipeline"} <= names


@pytest.mark.parametrize("path", _command_paths(app), ids=lambda p: " ".join(p))
def test_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_default_params_file_is_valid() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == Config.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    # params.yaml spells out every key, so `dvc exp run -S` always edits an existing one
    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")
    assert set(keys(yaml.safe_load((ROOT / "params.yaml").read_text()))) == set(keys(cfg.model_dump()))


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
