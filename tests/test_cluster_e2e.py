"""End to end: studies beyond one machine (docs/CLUSTER.md), on one 2-core machine.

Every experiment is the tiny project of tests/tinyrepo.py with the real dvc.yaml, stages
and library. One PostgreSQL-backed ``mlflow server`` (tests/servers.py) serves the module;
a bare git repository and a local folder stand in for the shared git and DVC remotes.

1. N processes log to the server at once and no metric is lost;
2. ``dmp study --gpus 0,1 seeds``: two DVC queue workers pinned to fake GPU ids run two
   experiments; each records the CUDA_VISIBLE_DEVICES it saw; both reach the report;
3. ``dmp study --engine ray``: a local Ray cluster with two fake GPU slots runs the job
   runner once per experiment; the experiments reach the shared remotes; a fresh clone
   collects them and its report names every one;
4. two clones acting as two machines run different experiments of one study at the
   same time; one is killed outright mid-pretraining and resubmitted elsewhere: its data
   stages come back from the run cache (its log says so); a third clone collects both,
   and before the resubmission it reports the study as partial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import mlflow_server, postgres, require_postgres
from tinyrepo import TINY_SETTINGS, make_tiny_project, test_env

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1200)]
# shorter than the workflow test's tiny run: the cluster machinery is what is under test
SETTINGS = TINY_SETTINGS + ["pretrain.steps=4", "finetune.steps=2", "++pretrain.val_every=4",
                            "++finetune.val_every=2", "++pretrain.checkpoint_every=2"]


def _run(cwd: Path, *cmd: str, check: bool = True, env: dict | None = None, timeout: float = 900):
    proc = subprocess.run(list(cmd), cwd=cwd, env=env or test_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _dmp(cwd: Path, *args: str, **kw):
    return _run(cwd, sys.executable, "-m", "stages", *args, **kw)


def _exp_files(repo: Path, name: str, path: str) -> str:
    refs = _run(repo, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout
    shas = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
    assert len(shas) == 1, (name, refs)
    return _run(repo, "git", "show", f"{shas[0]}:{path}").stdout


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    require_postgres()
    folder = tmp_path_factory.mktemp("tracking")
    with postgres() as db, mlflow_server(db, folder / "artifacts") as uri:
        yield uri


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The tiny project, its bare git remote and a local-folder DVC remote."""
    root = tmp_path_factory.mktemp("cluster")
    origin = make_tiny_project(root / "origin", SETTINGS)
    _run(root, "git", "clone", "-q", "--bare", str(origin), str(root / "remote.git"))
    (root / "dvc-store").mkdir()
    return {"root": root, "origin": origin, "git": root / "remote.git", "dvc": root / "dvc-store"}


def _clone(shared: dict[str, Path], name: str) -> Path:
    dest = shared["root"] / name
    _run(shared["root"], "git", "clone", "-q", str(shared["git"]), str(dest))
    return dest


def test_concurrent_writers_lose_no_metric_on_the_postgres_backed_server(tracking: str) -> None:
    from mlflow import MlflowClient

    writers, steps = 4, 60
    script = (
        "import sys; from dmp_core.tracking import Tracker; from conftest import tiny_config\n"
        "cfg = tiny_config(tracking__uri=sys.argv[1], tracking__experiment='concurrent')\n"
        "t = Tracker(cfg, 'pretrain')\n"
        f"for step in range(1, {steps + 1}):\n"
        "    t.log_metrics({'loss': step * 0.5, 'loss_itc': step * 0.25}, step)\n"
        "    if step % 5 == 0: t.flush()\n"
        "t.end(); print(t.run_id)\n")
    env = test_env() | {"PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{Path(__file__).parents[1]}"}
    procs = [subprocess.Popen([sys.executable, "-c", script, tracking], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(writers)]
    run_ids = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    client = MlflowClient(tracking)
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        for key, scale in (("loss", 0.5), ("loss_itc", 0.25)):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert history == [(s, s * scale) for s in range(1, steps + 1)], (run_id, key)


def test_two_queue_workers_pinned_to_gpus_run_two_experiments(shared, tracking: str) -> None:
    """Both experiments are queued before the workers start, and a DVC worker takes one
    experiment at a time (no prefetch): each worker runs one, on its own GPU id."""
    repo = _clone(shared, "queue")
    _dmp(repo, "study", "--gpus", "0,1", "--tracking-uri", tracking, "seeds", "--variants", "denoising",
         "--seeds", "2", "--poll-s", "2")
    names = [f"seed-denoising-s{s}" for s in (0, 1)]
    seen = {}
    for name in names:
        for stage in ("pretrain", "finetune"):
            env = json.loads(_exp_files(repo, name, f"reports/{stage}/run.json"))["environment"]
            seen.setdefault(name, set()).add(env["cuda_visible_devices"])
    assert all(len(gpus) == 1 and gpus <= {"0", "1"} for gpus in seen.values()), seen  # one pinned GPU each
    assert set().union(*seen.values()) == {"0", "1"}, seen  # both workers ran experiments
    results = (repo / "reports" / "results.md").read_text()
    assert all(name in results for name in names), results[:3000]


def test_ray_study_pushes_to_the_remotes_and_a_fresh_clone_collects_it(shared, tracking: str) -> None:
    from mlflow import MlflowClient

    head = _clone(shared, "ray-head")
    work = shared["root"] / "ray-jobs"
    proc = _dmp(head, "study", "--engine", "ray", "--local-gpus", "2", "--gpus-per-exp", "1", "--git-remote",
                str(shared["git"]), "--dvc-remote", str(shared["dvc"]), "--tracking-uri", tracking,
                "--workdir", str(work), "--name", "ray-study", "seeds", "--variants", "denoising,mamo", "--seeds", "1")
    names = ["seed-denoising-s0", "seed-mamo-s0"]
    out = proc.stdout + proc.stderr
    assert "2 Ray tasks submitted (1 GPU each)" in out, out[-3000:]
    for name in names:  # Ray pinned one fake GPU per task; the job ran the data stages from the warm-up's cache
        log = (work / "ray-study" / f"{name}.log").read_text()
        assert "CUDA_VISIBLE_DEVICES=0," in log or "CUDA_VISIBLE_DEVICES=1," in log, log[:500]
        assert "Stage 'targets' is cached - skipping run" in log, log[-3000:]
    refs = _run(shared["root"], "git", "ls-remote", str(shared["git"]), "refs/exps/*").stdout
    assert all(f"/{name}" in refs for name in names), refs

    fresh = _clone(shared, "collector")
    proc = _dmp(fresh, "study", "collect", "ray-study", "--git-remote", str(shared["git"]))
    results = (fresh / "reports" / "results.md").read_text()
    assert all(name in results for name in names) and "all 2 experiments collected" in results, results[:3000]
    runs = MlflowClient(tracking).search_runs(
        [e.experiment_id for e in MlflowClient(tracking).search_experiments()],
        filter_string="tags.`dmp.study` = 'ray-study'")
    assert {r.info.run_name for r in runs} >= {f"{n}/{s}" for n in names for s in ("pretrain", "finetune")}


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, f"job ended before {text!r}: {path.read_text()[-3000:] if path.is_file() else ''}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def test_two_machines_a_killed_job_resubmitted_and_a_third_clone_collects(shared, tracking: str) -> None:
    head = _clone(shared, "machines-head")
    proc = _dmp(head, "study", "--engine", "jobs", "--no-warm-up", "--git-remote", str(shared["git"]),
                "--dvc-remote", str(shared["dvc"]), "--tracking-uri", tracking, "--name", "two-machines",
                "scaling", "--axis", "data", "--fractions", "0.5", "--variants", "denoising", "--seeds", "2")
    jobs = [line.split() for line in proc.stdout.splitlines() if line.startswith("dmp job run two-machines ")]
    first, second = "scale-denoising-f050-s0", "scale-denoising-f050-s1"  # names no other study here has
    assert [job[4] for job in jobs] == [first, second], proc.stdout
    machine = {name: shared["root"] / f"machine-{name}" for name in ("a", "b", "c")}

    def start(job: list[str], where: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "stages", *job[1:job.index("--workdir")], "--workdir", str(where)]
        return subprocess.Popen(cmd, cwd=shared["root"], env=test_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    a, b = start(jobs[0], machine["a"]), start(jobs[1], machine["b"])
    log_b = machine["b"] / "two-machines" / f"{second}.log"
    _wait_for(log_b, "Running stage 'pretrain'", b)
    _wait_for(machine["b"] / "two-machines" / second / "models" / "pretrain" / "checkpoints"
              / "latest.json", "", b)  # mid-pretraining: a checkpoint exists, training goes on
    os.killpg(b.pid, signal.SIGKILL)  # the whole job, as a lost node would: nothing runs after this
    b.wait(timeout=60)
    assert a.wait(timeout=900) == 0, a.stdout.read()[-3000:]

    collector = _clone(shared, "machines-collector")
    proc = _dmp(collector, "study", "collect", "two-machines", "--git-remote", str(shared["git"]))
    assert f"PARTIAL, missing: {second}" in proc.stdout
    assert "two-machines is PARTIAL" in (collector / "reports" / "results.md").read_text()

    resubmitted = start(jobs[1], machine["c"])  # another machine: nothing of b's clone is there
    assert resubmitted.wait(timeout=900) == 0, resubmitted.stdout.read()[-3000:]
    log = (machine["c"] / "two-machines" / f"{second}.log").read_text()
    for stage in ("preprocess", "targets"):  # b finished them and pushed them before training
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in log, log[-4000:]
    assert "Running stage 'pretrain'" in log and "Running stage 'preprocess'" not in log

    proc = _dmp(collector, "study", "collect", "two-machines", "--git-remote", str(shared["git"]))
    results = (collector / "reports" / "results.md").read_text()
    assert first in results and second in results and "PARTIAL" not in results
