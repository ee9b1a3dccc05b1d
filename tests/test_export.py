"""``dmp report --export-runs``: an experiment commit's numbers are copied out, its images never."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from dmp_core.errors import DmpError


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_export_copies_each_experiments_numbers_and_no_images(tmp_path, monkeypatch) -> None:
    import orchestration.export as export

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    (repo / "reports/evaluate").mkdir(parents=True)
    (repo / "reports/pretrain").mkdir()
    (repo / "data/prepared/test").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "reports/evaluate/metrics.json").write_text('{"r_mean": 50.0}')
    ranks = {"txt2img": np.arange(4), "finetune_itm_tr": np.array([0, 3, 1, 0])}
    np.savez(repo / "reports/evaluate/ranks.npz", **ranks)
    (repo / "reports/pretrain/history.csv").write_text("step,loss\n1,2.0\n")
    np.save(repo / "data/prepared/test/images.npy", np.zeros((2, 4, 4, 3), np.uint8))  # never exported
    (repo / "reports/evaluate/scores.npz").write_bytes(b"score matrices: never exported")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "experiment")
    sha = _git(repo, "rev-parse", "HEAD")
    rows = [{"Experiment": None, "rev": "workspace", "typ": "baseline"},
            {"Experiment": "seed-frozen-s1", "rev": sha, "typ": "branch_commit", "State": None},
            {"Experiment": "failed", "rev": "f" * 40, "typ": "branch_commit", "State": "Failed"}]
    monkeypatch.setattr(export, "experiment_rows", lambda num=-1: (rows, None))
    monkeypatch.chdir(repo)

    out = tmp_path / "out"
    assert export.export_experiments(out) == ["seed-frozen-s1"]
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == ["seed-frozen-s1/params.yaml", "seed-frozen-s1/reports/evaluate/metrics.json",
                   "seed-frozen-s1/reports/evaluate/ranks.npz", "seed-frozen-s1/reports/pretrain/history.csv"]
    with np.load(out / "seed-frozen-s1/reports/evaluate/ranks.npz") as npz:  # binary-safe
        np.testing.assert_array_equal(npz["finetune_itm_tr"], ranks["finetune_itm_tr"])

    monkeypatch.setattr(export, "experiment_rows", lambda num=-1: ([], "not a DVC repository"))
    with pytest.raises(DmpError, match="export-runs: not a DVC repository"):
        export.export_experiments(out)
