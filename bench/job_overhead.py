"""What the job runner adds to one experiment of a study (bench/README.md, "Job runner").

Builds the tiny project of the tests (tests/tinyrepo.py) with a bare git remote and a
local-folder DVC remote, publishes a study of ``--jobs`` experiments (seeds 0..N-1 of
one variant), warms it up, and runs each job with ``orchestration.jobs.run_job`` one after
the other. For comparison, the same experiment runs as a plain ``dvc exp run`` in a clone
that already holds the data stages (no clone, no pull, no push). Prints one markdown row
per job with the seconds of each step of the runner, then the plain run.

    python bench/job_overhead.py --jobs 2
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="experiments (seeds) to run through the runner")
    args = parser.parse_args()

    from tinyrepo import make_tiny_project, test_env

    env = test_env()
    os.environ.clear()
    os.environ.update(env)
    from orchestration.jobs import StudySpec, publish_spec, run_job, warm_up

    tmp = Path(tempfile.mkdtemp(prefix="dmp-job-bench-"))
    origin = make_tiny_project(tmp / "origin")
    subprocess.run(["git", "clone", "-q", "--bare", str(origin), str(tmp / "remote.git")], check=True)
    (tmp / "dvc-store").mkdir()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin, capture_output=True, text=True).stdout.strip()
    plan = {f"seed-denoising-s{s}": {"objective.variant": "denoising", "seed": str(s)} for s in range(args.jobs)}
    spec = StudySpec("bench", commit, str(tmp / "remote.git"), str(tmp / "dvc-store"),
                     f"sqlite:///{tmp}/mlflow.db", plan)
    publish_spec(spec, origin)
    t0 = time.perf_counter()
    warm_up(spec, tmp / "work")
    warm = time.perf_counter() - t0

    print(f"# {platform.node()}, {os.cpu_count()} cores, tiny config (tests/tinyrepo.py), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"warm-up (data stages of {len(plan)} seeds, pushed): {warm:.1f} s\n")
    steps = ["clone", "pull_run_cache", "data_stages", "run", "push"]
    print("| job | " + " | ".join(steps) + " | total | overhead (total - run) |")
    print("|---" * (len(steps) + 3) + "|")
    for name in plan:
        result = run_job(spec, name, tmp / "work")
        assert result.ok, result.error
        total = sum(result.seconds.values())
        print(f"| {name} | " + " | ".join(f"{result.seconds[s]:.1f}" for s in steps)
              + f" | {total:.1f} | {total - result.seconds['run']:.1f} |")

    # the same experiment without the runner: in the origin, whose data stages are done
    subprocess.run([sys.executable, "-m", "dvc", "repro", "targets"], cwd=origin, check=True, capture_output=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", "plain", "-S", "++seed=0"], cwd=origin,
                   check=True, capture_output=True)
    print(f"\nplain `dvc exp run` of seed 0 in a clone with its data stages done: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
