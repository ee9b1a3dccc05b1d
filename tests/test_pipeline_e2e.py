"""End to end: the real dvc.yaml in a temporary git repo, on a tiny configuration.

- ``dvc repro targets`` runs the three data stages, and a second call runs nothing;
- ``dvc repro`` runs the rest; ``dvc exp run -S objective.vicreg=false`` runs an
  ablation; a queued experiment runs through ``dvc queue start``;
- ``dvc exp show --json`` lists them all with metrics, the report names them, and
  the queued run landed in the workspace's MLflow store (not the temp copy's).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dmp_core", "stages", "dvc.yaml", ".dvcignore", "pyproject.toml"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    # `python` in dvc.yaml must be this interpreter (the project's venv)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONPATH", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "dmp-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "dmp-test@example.invalid"
    return env


def _run(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=_env(repo), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(repo, sys.executable, "-m", "dvc", *args, check=check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("e2e") / "proj"
    repo.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    cfg = tiny_config(
        pretrain__max_steps=6, finetune__max_steps=4,
        pretrain__checkpoint_every=3, finetune__checkpoint_every=2,
        pretrain__num_workers=0, finetune__num_workers=0,
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny project")
    return repo


def test_data_stages_then_nothing_to_do(repo: Path) -> None:
    first = _dvc(repo, "repro", "targets")
    for stage in ("download", "preprocess", "targets"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    assert (repo / "data/prepared/train/images.npy").is_file()
    assert (repo / "data/targets/train/hog.npy").is_file()
    summary = json.loads((repo / "reports/preprocess/summary.json").read_text())
    assert summary  # counts are written
    second = _dvc(repo, "repro", "targets")
    assert "Running stage" not in second.stdout, second.stdout


def test_full_repro_ablation_and_queue(repo: Path) -> None:
    _dvc(repo, "repro")
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert {"pretrain", "finetune"} <= set(metrics)
    assert (repo / "reports/results.md").is_file()

    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline results")

    # queue first: a queued experiment snapshots the workspace as it is now
    _dvc(repo, "exp", "run", "--queue", "-n", "queued-mamo", "-S", "objective.variant=mamo")
    _dvc(repo, "exp", "run", "-n", "no-vicreg", "-S", "objective.vicreg=false")
    _dvc(repo, "queue", "start", "-j", "1")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = _dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    else:
        raise AssertionError("queued experiment did not finish in time:\n" + status)
    assert "Failed" not in status, _dvc(repo, "queue", "logs", "queued-mamo", check=False).stdout

    shown = json.loads(_dvc(repo, "exp", "show", "--json").stdout)
    names = {
        exp.get("name")
        for commit in shown
        for exp in (commit.get("experiments") or [])
        for exp in (exp.get("revs") or [])
    }
    assert {"no-vicreg", "queued-mamo"} <= names, names

    # the queued experiment ran in .dvc/tmp/exps/..., but its MLflow runs are in our store
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    tagged = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert "queued-mamo" in tagged, tagged

    # the report reads the experiment table: both experiments appear in it
    _dvc(repo, "repro", "report")
    report = (repo / "reports/results.md").read_text()
    assert "no-vicreg" in report and "queued-mamo" in report
