"""End to end: the README's study workflow (docs/WORKFLOW.md), in order, in ONE temporary
git + DVC repository on a tiny configuration (the real dvc.yaml, stages and library).

The steps are separate tests that run in file order against the module's repository, so
a failure names the step that broke; a step whose earlier steps did not pass is skipped
(its own checks would only repeat that failure). Each full pipeline runs once:

1. ``dvc repro targets``: the ``params`` check and the three data stages; their
   ``dvc.lock`` is committed, as a clone's is;
2. ``python -m stages pipeline`` (``make run``): every stage in the workspace, saved as
   the DVC experiment ``denoising-default``; ``mamo-default`` runs in a ``--temp`` copy;
   the report; the files to commit are named;
3. ``make run`` again: only the always-changed stages (``params``, ``download``,
   ``report``) run, nothing downstream of the unchanged manifest, and ``mamo-default``
   is kept;
4. ``dvc exp run -S objective.vicreg=false`` in the workspace (overwrites the workspace
   outputs: the baseline survives only because step 2 saved it);
5. a typo, ``dvc exp run -S ++objective.vicerg=false``: the ``params`` stage refuses it
   before DVC removes any later stage's output (every output is byte-identical after);
   the plain ``-S objective.vicerg=false`` is refused by DVC itself, whose message
   suggests the ``+key`` trap;
6. ``python -m stages report``: the baseline row keeps the baseline's numbers, the
   ablation row is labelled by its change;
7. ``dmp study scaling --axis data --fractions 0.5``: one experiment queued and run through
   ``dvc queue start`` in ``.dvc/tmp/exps/``; it trains the baseline's number of optimiser
   steps (twice the epochs), its MLflow runs land in the workspace's store (tagged
   ``dvc.exp_name``), it is exported to ``reports/runs/`` as it finishes, and the report
   names it; the same command again runs nothing (the export is that run);
8. ``dvc exp show --csv``: every experiment with its metrics, under 60 columns.

The tiny params.yaml is the project's lean params.yaml with the tiny settings added by
DVC's own ``-S ++key=value`` writer, as a user would.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dmp_core.config import config_from_dict

from tinyrepo import ROOT, TINY_SETTINGS, make_tiny_project, test_env as _env

SCALED = "scale-denoising-f050-s0"  # the one experiment of the scaling step
# every output of the workspace run that a failed experiment must leave alone
GUARDED = [
    "data/manifest.json", "data/prepared/train/images.npy", "data/targets/train/hog.npy",
    "models/pretrain/model.safetensors", "reports/pretrain/metrics.json", "reports/pretrain/history.csv",
    "reports/pretrain/run.json", "models/finetune/model.safetensors", "reports/finetune/metrics.json",
    "reports/evaluate/metrics.json", "reports/evaluate/details.json", "reports/evaluate/ranks.npz",
    "reports/results.md",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
TIMES: dict[str, float] = {}
PASSED: set[str] = set()  # the steps that passed, for the ones that build on them


def _require(*steps: str) -> None:
    """Skip this step when a step it builds on did not pass (that step's failure says why)."""
    missing = [s for s in steps if s not in PASSED]
    if missing:
        pytest.skip(f"needs the earlier step(s) {', '.join(missing)}, which did not pass")


def _run(repo: Path, *cmd: str, check: bool = True, label: str | None = None) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=repo, env=_env(), capture_output=True, text=True)
    if label:
        TIMES[label] = time.perf_counter() - t0
        print(f"[workflow] {label}: {TIMES[label]:.0f} s", file=sys.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def _dvc(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return _run(repo, sys.executable, "-m", "dvc", *args, **kw)


def _dmp(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return _run(repo, sys.executable, "-m", "stages", *args, **kw)


def _ran(output: str) -> list[str]:
    """The stages DVC ran, in order (its ``Running stage '<name>':`` lines)."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def _exp_sha(repo: Path, name: str) -> str:
    """The commit of the named DVC experiment (refs/exps/.../<name>)."""
    refs = _run(repo, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout
    shas = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
    assert len(shas) == 1, refs
    return shas[0]


def _show(repo: Path, rev: str, path: str) -> str:
    return _run(repo, "git", "show", f"{rev}:{path}").stdout


def _digests(repo: Path) -> dict[str, str]:
    return {p: hashlib.sha256((repo / p).read_bytes()).hexdigest() for p in GUARDED}


def _flat_keys(params_yaml: str) -> set[str]:
    from dmp_core.config import flatten

    return set(flatten(yaml.safe_load(params_yaml) or {}))


def _main_table(results_md: str) -> list[dict[str, str]]:
    """The rows of the report's first Markdown table with a Method and an R mean column."""
    lines = results_md.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and "Method" in cells and "R mean" in cells:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            return rows
    raise AssertionError("no main table (Method ... R mean) in results.md:\n" + results_md[:3000])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("workflow") / "proj")


def test_data_stages_run_once_and_are_committed(repo: Path) -> None:
    proc = _dvc(repo, "repro", "targets", label="dvc repro targets")
    assert _ran(proc.stdout) == ["params", "download", "preprocess", "targets"], proc.stdout
    assert (repo / "data/params.ok").is_file() and (repo / "data/manifest.json").is_file()
    assert (repo / "data/prepared/train/images.npy").is_file()
    assert (repo / "data/targets/train/hog.npy").is_file()
    assert json.loads((repo / "reports/preprocess/summary.json").read_text())  # counts are written
    # a clone has its dvc.lock committed; the --temp and queued copies of the later steps
    # (built from git) then find the data stages' lock and the DVC cache
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "data stages")
    PASSED.add("data")


def test_make_run_saves_the_baseline_and_the_other_variant(repo: Path) -> None:
    _require("data")
    proc = _dmp(repo, "pipeline", label="pipeline (make run)")
    out = proc.stdout + proc.stderr
    for step in ("dvc repro", "dvc exp save -n denoising-default", "dvc exp run --temp -n mamo-default",
                 "dvc repro report", "total"):
        timed = [line for line in out.splitlines() if line.strip().startswith(step) and line.rstrip().endswith(" s")]
        assert timed, (step, out[-3000:])
    # the workspace run: every later stage (the data stages are done), then both
    # training stages and evaluation once more for mamo in the --temp copy
    ran = _ran(out)
    print(f"[workflow] stages run by make run: {' '.join(ran)}", file=sys.stderr)
    for stage in ("pretrain", "finetune", "evaluate"):
        assert ran.count(stage) == 2, ran
    # results are not committed: it says which files and how to keep them
    add = [line for line in out.splitlines() if line.strip().startswith("git add -A -- ")]
    assert len(add) == 1, out[-3000:]
    for path in ("dvc.lock", "reports/evaluate/metrics.json", "reports/evaluate/details.json",
                 "reports/evaluate/ranks.npz", "reports/results.md"):
        assert f" {path} " in add[0], (path, add[0])
    assert "data/raw" not in add[0] and "git commit -m" in add[0]
    assert "tree clean" not in out

    # the workspace outputs of the evaluate stage (the contracts of docs: metrics, details, ranks)
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert {"pretrain", "finetune"} <= set(metrics)
    details = json.loads((repo / "reports/evaluate/details.json").read_text())
    assert {"pretrain", "finetune"} <= set(details["models"])
    with np.load(repo / "reports/evaluate/ranks.npz") as ranks:
        assert "txt2img" in ranks and "finetune_itm_ir" in ranks
    assert (repo / "reports/results.md").is_file()

    names = set(_dvc(repo, "exp", "list", "--name-only").stdout.split())
    assert {"denoising-default", "mamo-default"} <= names
    base = _exp_sha(repo, "denoising-default")
    # the saved experiment holds the workspace result, untracked outputs included (-I)
    assert json.loads(_show(repo, base, "reports/evaluate/metrics.json")) == metrics
    assert "finetune" in json.loads(_show(repo, base, "reports/evaluate/details.json"))["models"]
    assert yaml.safe_load(_show(repo, base, "params.yaml"))["objective"]["variant"] == "denoising"
    mamo = _exp_sha(repo, "mamo-default")
    assert yaml.safe_load(_show(repo, mamo, "params.yaml"))["objective"]["variant"] == "mamo"
    assert json.loads(_show(repo, mamo, "reports/pretrain/metrics.json"))["steps"] == 6
    PASSED.add("make run")


def test_make_run_again_reruns_only_the_always_changed_stages(repo: Path) -> None:
    _require("make run")
    mamo = _exp_sha(repo, "mamo-default")
    marker = (repo / "data/params.ok").read_bytes()
    proc = _dmp(repo, "pipeline", label="pipeline again")
    out = proc.stdout + proc.stderr
    assert "experiment 'mamo-default' exists for this commit: kept" in out
    assert _exp_sha(repo, "mamo-default") == mamo
    # `params` and `download` always run (the raw folder may be outside DVC's view) and
    # `report` always runs (it reads the experiment table); the unchanged marker and
    # manifest keep every other stage, from preprocess on, from re-running
    assert set(_ran(out)) == {"params", "download", "report"}, out[-3000:]
    assert (repo / "data/params.ok").read_bytes() == marker
    PASSED.add("make run again")


def test_a_changed_default_in_the_schema_makes_the_stages_that_read_it_stale(repo: Path) -> None:
    """Every key absent from the lean params.yaml takes its default from dmp_core/config.py, so
    the schema is a dependency of every stage that reads params: a changed default shows in
    ``dvc status`` (restored afterwards; no output is touched)."""
    _require("make run")
    schema = repo / "dmp_core" / "config.py"
    original = schema.read_text()
    old = "warmup_lr: float = Field(1e-6, ge=0.0)"
    assert original.count(old) == 1
    try:
        schema.write_text(original.replace(old, "warmup_lr: float = Field(2e-6, ge=0.0)"))
        status = json.loads(_dvc(repo, "status", "--json").stdout)
        stale = {stage for stage, changes in status.items()
                 if any("dmp_core/config.py" in str(change) for change in changes)}
        assert {"preprocess", "targets", "pretrain", "finetune", "evaluate"} <= stale, status
    finally:
        schema.write_text(original)
    status = json.loads(_dvc(repo, "status", "--json").stdout)
    assert not any("dmp_core/config.py" in str(changes) for changes in status.values()), status


def test_ablation_in_the_workspace(repo: Path) -> None:
    _require("make run")
    _dvc(repo, "exp", "run", "-S", "objective.vicreg=false", label="dvc exp run -S objective.vicreg=false")
    assert yaml.safe_load((repo / "params.yaml").read_text())["objective"]["vicreg"] is False
    metrics = json.loads((repo / "reports/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 6
    history = (repo / "reports/pretrain/history.csv").read_text().splitlines()
    header = history[0].split(",")
    vicreg = [row.split(",")[header.index("loss_vicreg")] for row in history[1:]]
    assert set(vicreg) == {""}  # the ablated term did not run
    PASSED.add("ablation")


def test_typo_removes_no_output(repo: Path) -> None:
    _require("ablation")
    before_params = (repo / "params.yaml").read_text()
    before = _digests(repo)
    try:
        # DVC itself refuses a plain -S for a key params.yaml lacks, and suggests `+key` (the trap)
        proc = _dvc(repo, "exp", "run", "-S", "objective.vicerg=false", check=False)
        assert proc.returncode != 0 and "+objective.vicerg" in proc.stdout + proc.stderr
        assert (repo / "params.yaml").read_text() == before_params

        # with ++ (or the suggested +) DVC writes the typo; the params stage refuses it first
        proc = _dvc(repo, "exp", "run", "-S", "++objective.vicerg=false", check=False, label="typo")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "dmp check: error:" in out and "objective.vicerg" in out and "git checkout params.yaml" in out
        assert _ran(out) == ["params"], out[-3000:]
        assert _digests(repo) == before  # every later stage's output is untouched
        # DVC leaves the typo in params.yaml (docs/WORKFLOW.md: undo it)
        assert "vicerg: false" in (repo / "params.yaml").read_text()
    finally:
        (repo / "params.yaml").write_text(before_params)  # the later steps start from the ablation
    status = _dvc(repo, "status").stdout
    for stage in ("preprocess", "targets", "pretrain", "finetune", "evaluate"):
        assert f"{stage}:" not in status, status
    PASSED.add("typo")


def test_report_keeps_the_baseline_and_labels_the_ablation(repo: Path) -> None:
    _require("ablation")
    _dmp(repo, "report", label="dmp report")
    rows = [r for r in _main_table((repo / "reports/results.md").read_text()) if r.get("Model") == "finetuned"]
    by_method = {r["Method"]: r for r in rows}

    def expected(metrics: dict) -> dict[str, str]:
        fin = metrics["finetune"]
        return {"TR R@1": f"{fin['tr_r1']:.1f}", "IR R@1": f"{fin['ir_r1']:.1f}", "R mean": f"{fin['r_mean']:.1f}"}

    def shown(row: dict) -> dict[str, str]:
        return {k: row[k] for k in ("TR R@1", "IR R@1", "R mean")}

    baseline = json.loads(_show(repo, _exp_sha(repo, "denoising-default"), "reports/evaluate/metrics.json"))
    ablation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    mamo = json.loads(_show(repo, _exp_sha(repo, "mamo-default"), "reports/evaluate/metrics.json"))

    base_rows = [r for m, r in by_method.items() if m.startswith("denoising") and "baseline" in m]
    assert len(base_rows) == 1, list(by_method)
    assert shown(base_rows[0]) == expected(baseline)
    abl_rows = [r for m, r in by_method.items() if "vicreg=false" in m]
    assert len(abl_rows) == 1, list(by_method)
    assert "baseline" not in abl_rows[0]["Method"]
    assert shown(abl_rows[0]) == expected(ablation)
    assert shown(by_method["mamo"]) == expected(mamo)
    PASSED.add("report")


def test_queued_scaling_study_trains_equal_steps_into_the_workspace_store(repo: Path) -> None:
    """One fraction (0.5) against the baseline's 1.0, queued and run by ``dvc queue start``:
    the same optimiser steps, twice the epochs; MLflow runs in the workspace's store."""
    _require("make run")
    study = ["study", "scaling", "--axis", "data", "--fractions", "0.5", "--variants", "denoising", "--seeds", "1",
             "--poll-s", "2"]
    proc = _dmp(repo, *study, label="dmp study scaling (1 queued experiment)")
    out = proc.stdout + proc.stderr
    assert "equal optimiser steps" in out
    assert f"study: queued {SCALED} (1/1)" in out and "1/1 finished" in out, out[-3000:]
    failed = [line for line in out.splitlines() if line.startswith("study:") and " failed" in line]
    assert not failed, (failed, _dvc(repo, "queue", "logs", SCALED, check=False).stdout[-3000:])

    half = _exp_sha(repo, SCALED)
    full = _exp_sha(repo, "denoising-default")
    assert yaml.safe_load(_show(repo, half, "params.yaml"))["data"]["fraction"] == 0.5
    # the baseline's params.yaml leaves data.fraction out: the schema's default (all) applies
    full_data = config_from_dict(yaml.safe_load(_show(repo, full, "params.yaml"))).data
    assert full_data.fraction == 1.0
    for stage, steps in (("pretrain", 6), ("finetune", 4)):
        at_half = json.loads(_show(repo, half, f"reports/{stage}/metrics.json"))
        at_full = json.loads(_show(repo, full, f"reports/{stage}/metrics.json"))
        assert at_half["steps"] == at_full["steps"] == steps
        assert at_half["epochs"] == pytest.approx(2 * at_full["epochs"])

    # the queued experiment ran in .dvc/tmp/exps/..., but its MLflow runs are in the
    # workspace's store (as are the --temp copy's), tagged with the experiment's name
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    stages_of: dict[str, set[str]] = {}
    for r in runs:
        stages_of.setdefault(r.data.tags.get("dvc.exp_name", ""), set()).add(r.data.tags.get("dmp.stage"))
    for name in (SCALED, "mamo-default"):
        assert stages_of.get(name) == {"pretrain", "finetune"}, stages_of
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("dvc.exp_name") == SCALED)

    # the study ends with the report, which reads the experiment table: it names them all
    report = (repo / "reports/results.md").read_text()
    for name in (SCALED, "denoising-default", "mamo-default"):
        assert name in report, name

    # exported as it finished: the experiment commit's numbers and its provenance (shas only)
    exported = repo / "reports/runs" / SCALED
    assert (exported / "params.yaml").read_text() == _show(repo, half, "params.yaml")
    metrics = "reports/evaluate/metrics.json"
    assert (exported / metrics).read_text() == _show(repo, half, metrics)
    head = _run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert json.loads((exported / "source.json").read_text()) == {"experiment": SCALED, "commit": half,
                                                                   "baseline": head}
    assert "git add reports/runs && git commit" in out
    # the same command again: the export is that run, so nothing is queued
    again = _dmp(repo, *study, label="dmp study scaling again (resumed: nothing to run)")
    out = again.stdout + again.stderr
    assert f"skip {SCALED}: finished as reports/runs/{SCALED}" in out, out[-3000:]
    assert "0 of 1 planned runs remain" in out, out[-3000:]
    assert "study: queued" not in out and "study: exported" not in out
    PASSED.add("scaling")


def test_exp_show_lists_every_experiment_in_under_60_columns(repo: Path) -> None:
    _require("make run", "ablation", "scaling")
    text = _dvc(repo, "exp", "show", "--csv", label="dvc exp show --csv").stdout
    header = next(csv.reader(io.StringIO(text)))
    rows = list(csv.DictReader(io.StringIO(text)))
    named = {row["Experiment"]: row for row in rows if row.get("Experiment")}
    # the two baselines, the workspace ablation (auto-named by DVC) and the queued
    # experiment, each with its headline metric
    assert {"denoising-default", "mamo-default", SCALED} <= set(named), sorted(named)
    ablations = set(named) - {"denoising-default", "mamo-default", SCALED}
    assert len(ablations) == 1, sorted(named)
    assert named[ablations.pop()]["objective.vicreg"] == "False"
    for name, row in named.items():
        assert float(row["finetune.r_mean"]) >= 0, (name, row["finetune.r_mean"])

    # fewer than 60 columns for the project's own params.yaml: the keys the lean
    # params.yaml lacks that this test (tiny settings) or the study (training length)
    # added are not counted
    project = _flat_keys((ROOT / "params.yaml").read_text())
    added = {item.lstrip("+").split("=")[0] for item in TINY_SETTINGS}
    added |= _flat_keys(_show(repo, _exp_sha(repo, SCALED), "params.yaml"))
    extra = [column for column in header if column in added - project]
    assert len(header) - len(extra) < 60, (len(header), len(extra), header)
    print(f"[workflow] dvc exp show --csv: {len(header)} columns, {len(header) - len(extra)} for the project's "
          f"params", file=sys.stderr)
    print(f"[workflow] times: {json.dumps({k: round(v) for k, v in TIMES.items()})}", file=sys.stderr)
