"""The job runner's pieces that need no DVC run: the study spec on a git remote, and the
warm-up's data settings (tests/test_cluster_e2e.py runs whole jobs)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestration.jobs import JobFailed, StudySpec, data_settings, fetch_spec, publish_spec, read_spec
from tinyrepo import test_env


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=test_env(), check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> tuple[Path, Path, str]:
    """A one-commit repository and its bare remote; returns (clone, remote, commit)."""
    work = tmp_path / "work"
    work.mkdir()
    _git(work, "init", "-q")
    (work / "params.yaml").write_text("seed: 0\n")
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "one")
    remote = tmp_path / "remote.git"
    _git(tmp_path, "clone", "-q", "--bare", str(work), str(remote))
    return work, remote, _git(work, "rev-parse", "HEAD")


def _spec(remote: Path, commit: str, **plan) -> StudySpec:
    return StudySpec("s1", commit, str(remote), "/shared/dvc", "http://mlflow:5000",
                     plan or {"seed-mamo-s0": {"objective.variant": "mamo", "seed": "0"}})


def test_a_published_spec_comes_back_from_the_remote_with_its_commit(repo, tmp_path) -> None:
    work, remote, commit = repo
    spec = _spec(remote, commit)
    ref = publish_spec(spec, work)
    assert ref == "refs/dmp/studies/s1"
    elsewhere = tmp_path / "elsewhere"
    _git(tmp_path, "init", "-q", str(elsewhere))
    assert fetch_spec(str(remote), "s1", elsewhere) == spec
    assert _git(elsewhere, "rev-parse", f"{ref}^") == commit  # the study's commit came with it
    assert spec.set_params("seed-mamo-s0") == ["++objective.variant=mamo", "++seed=0"]
    with pytest.raises(JobFailed, match="no experiment named 'nope'"):
        spec.set_params("nope")


def test_jobs_starting_at_once_in_one_workdir_each_read_the_spec(repo, tmp_path) -> None:
    """Ray starts a study's jobs together on one machine: a shared scratch repository raced on
    ``git init`` and failed one of them (CI, stop 21)."""
    from concurrent.futures import ThreadPoolExecutor

    work, remote, commit = repo
    spec = _spec(remote, commit)
    publish_spec(spec, work)
    jobs = tmp_path / "jobs"
    with ThreadPoolExecutor(max_workers=8) as pool:
        specs = list(pool.map(lambda _: read_spec(str(remote), "s1", jobs), range(16)))
    assert specs == [spec] * 16
    assert list(jobs.iterdir()) == []  # the scratch repositories are gone


def test_publishing_is_idempotent_and_refuses_another_plan_under_the_same_name(repo) -> None:
    work, remote, commit = repo
    publish_spec(_spec(remote, commit), work)
    publish_spec(_spec(remote, commit), work)  # the same spec again: nothing to do
    other = _spec(remote, commit, **{"seed-mamo-s1": {"seed": "1"}})
    with pytest.raises(JobFailed, match="already published .* choose another --name"):
        publish_spec(other, work)


def test_an_unpublished_study_is_named(repo, tmp_path) -> None:
    _, remote, _ = repo
    with pytest.raises(JobFailed, match="study nope: refs/dmp/studies/nope .*was the study published"):
        fetch_spec(str(remote), "nope", repo[0])


def test_a_broken_spec_is_one_line() -> None:
    with pytest.raises(JobFailed, match="remote refs/x: not a study spec"):
        StudySpec.from_json("{not json", "remote refs/x")


def test_warm_up_runs_each_distinct_data_setting_once() -> None:
    spec = StudySpec("s", "c", "g", "d", "u", {
        "a": {"objective.variant": "mamo", "seed": "0"},
        "b": {"objective.variant": "denoising", "seed": "0"},  # same data as a
        "c": {"objective.variant": "mamo", "seed": "1", "data.fraction": "0.5"},
        "d": {"model.preset": "minilm", "seed": "1", "data.fraction": "0.5"},
    })
    assert data_settings(spec) == [{"seed": "0"}, {"seed": "1", "data.fraction": "0.5"},
                                   {"model.preset": "minilm", "seed": "1", "data.fraction": "0.5"}]
