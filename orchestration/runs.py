"""The report's inputs, for ``dmp report`` (reports/results.md and reports/figures/ from every
finished run).

This module gathers the inputs from git, DVC and MLflow; ``dmp_core.report`` turns
them into tables, statistics, plots and the gallery:

- the workspace: params.yaml and the files under reports/ on disk;
- the HEAD commit and every DVC experiment (``dvc.api.exp_show``): the same files read
  with ``git show <rev>:<path>`` (the evaluate, pretrain and finetune outputs are
  ``cache: false``, so each experiment commit holds them);
- the baseline: HEAD's params.yaml, validated so that schema defaults fill absent keys;
- staleness: workspace params against HEAD's, and ``dvc status``;
- MLflow only where git lacks something (run ids by the ``dvc.exp_name`` tag, loss
  histories from metric histories);
- exported runs (``dmp report --runs DIR``, repeatable): every folder of DIR with
  ``params.yaml`` and ``reports/evaluate/metrics.json`` (what ``--export-runs`` and
  ``dmp study`` write), read from disk, named by the folder, sorted by name, and merged
  with the runs above when params and results are the same;
- a study's plan (``DIR/plan.json``, written by ``dmp study``): the runs it planned, each
  resolved as the ``--params`` file with its overrides; those that no run is (same method
  params and seed) are named in the report as missing points.

``--only-runs`` reads the exports alone (no workspace, HEAD, experiment, ``dvc status`` or
MLflow) and labels them by the ``--params`` file on disk, so that any clone, with or
without DVC experiments, regenerates a committed results.md byte for byte::

    dmp report --only-runs --runs reports/photos/runs \\
        --params reports/photos/params.yaml --reports reports/photos
"""
from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from orchestration.repo import echo

STAGES = ("pretrain", "finetune")
Reader = Callable[[str], Optional[bytes]]  # a path relative to the project root -> its bytes, or None


# ------------------------------------------------------------------ readers
def git_bytes(*args: str, cwd: Optional[Path] = None) -> Optional[bytes]:
    """stdout of ``git <args>``, or None when git fails (no repository, no such revision or path)."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_reader(rev: str, cwd: Optional[Path] = None) -> Reader:
    """Files of commit ``rev``, binary-safe (``git show <rev>:./<path>``, relative to ``cwd``).

    An absolute path is read relative to ``cwd`` when it lies inside it, else not at all."""
    base = Path(cwd or Path.cwd()).resolve()

    def read(path: str) -> Optional[bytes]:
        rel = Path(path)
        if rel.is_absolute():
            try:
                rel = rel.resolve().relative_to(base)
            except ValueError:
                return None
        return git_bytes("show", f"{rev}:./{rel.as_posix()}", cwd=cwd)

    return read


def disk_reader(root: Path = Path(".")) -> Reader:
    def read(path: str) -> Optional[bytes]:
        file = root / path
        return file.read_bytes() if file.is_file() else None

    return read


def _json(data: Optional[bytes], what: str, notes: list[str]) -> Optional[dict]:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        notes.append(f"{what} is not valid JSON (ignored)")
        return None
    return value if isinstance(value, dict) else None


def read_outputs(read: Reader, reports: Path = Path("reports")) -> dict[str, Any]:
    """What one run wrote: details, ranks, metrics (evaluate), training metrics, MLflow run ids, history.

    Missing files are None (or absent); unreadable ones add a note.
    """
    import numpy as np
    import pandas as pd

    notes: list[str] = []
    evaluate = reports / "evaluate"
    out: dict[str, Any] = {
        "details": _json(read(str(evaluate / "details.json")), "details.json", notes),
        "metrics": _json(read(str(evaluate / "metrics.json")), "metrics.json", notes),
        "ranks": None, "training": {}, "run_ids": {}, "history": None, "notes": notes,
        "split_images": {split: int(counts["images"]) for split, counts in (_json(
            read(str(reports / "preprocess" / "summary.json")), "preprocess/summary.json", notes) or {})
            .get("counts", {}).items() if isinstance(counts, dict) and isinstance(counts.get("images"), int)},
    }
    data = read(str(evaluate / "ranks.npz"))
    if data is not None:
        try:
            with np.load(io.BytesIO(data)) as npz:
                out["ranks"] = {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            notes.append("ranks.npz is not a readable npz (ignored)")
    for stage in STAGES:
        metrics = _json(read(str(reports / stage / "metrics.json")), f"{stage}/metrics.json", notes)
        if metrics is not None:
            out["training"][stage] = metrics
        run = _json(read(str(reports / stage / "run.json")), f"{stage}/run.json", notes) or {}
        if run.get("run_id"):
            out["run_ids"][stage] = str(run["run_id"])
    history = read(str(reports / "pretrain" / "history.csv"))
    if history:
        try:
            out["history"] = pd.read_csv(io.BytesIO(history))
        except (ValueError, pd.errors.ParserError):
            notes.append("pretrain/history.csv unreadable (ignored)")
    return out


def _run_from_outputs(names: list[str], params: dict, outputs: dict, *, workspace: bool = False,
                      rev: Optional[str] = None, notes: tuple[str, ...] = ()):
    from dmp_core.report import Run

    return Run(names=names, params=params, workspace=workspace, rev=rev, details=outputs["details"],
               ranks=outputs["ranks"], metrics=outputs["metrics"], training=outputs["training"],
               run_ids=outputs["run_ids"], split_images=outputs["split_images"], notes=[*notes, *outputs["notes"]])


def _has_results(outputs: dict) -> bool:
    return outputs["details"] is not None or outputs["metrics"] is not None


# ------------------------------------------------------------------ baseline and staleness
def head_commit(cwd: Optional[Path] = None) -> Optional[str]:
    out = git_bytes("rev-parse", "--short", "HEAD", cwd=cwd)
    return out.decode().strip() if out else None


def baseline_params(workspace_params: dict, params_path: Path = Path("params.yaml"),
                    cwd: Optional[Path] = None) -> tuple[dict, str, list[str]]:
    """(canonical params, where they come from, notes): HEAD's params file, else the workspace's."""
    import yaml

    from dmp_core.report import resolve_params

    sha = head_commit(cwd)
    if sha is None:
        return workspace_params, "the workspace params (no git commit)", []
    data = git_reader("HEAD", cwd)(str(params_path))
    if data is None:
        return workspace_params, f"the workspace params (no {params_path} at HEAD {sha})", []
    try:
        raw = yaml.safe_load(data) or {}
    except yaml.YAMLError:
        return workspace_params, f"the workspace params (HEAD {sha}:{params_path} is not valid YAML)", []
    params, note = resolve_params(raw, f"HEAD:{params_path}")
    return params, f"HEAD {sha} ({params_path})", [note] if note else []


def stale_stages() -> tuple[list[str], Optional[str]]:
    """Pipeline stages that ``dvc status`` lists as changed, or ([], why) when it cannot run."""
    try:
        from dvc.repo import Repo

        with Repo() as repo:
            status = repo.status()
    except Exception as err:  # noqa: BLE001  (not a DVC repo, locked, ...): the report still gets written
        return [], f"`dvc status` not read ({type(err).__name__}); staleness of the workspace outputs unknown"
    return sorted(str(name).split(":")[-1] for name in status), None


# ------------------------------------------------------------------ experiments
def experiment_rows(num: int = -1) -> tuple[list[dict], Optional[str]]:
    """``dvc.api.exp_show`` rows, or ([], why) when this is not a usable DVC repo."""
    try:
        import dvc.api

        return dvc.api.exp_show(num=num), None
    except Exception as err:  # noqa: BLE001  (no git/DVC repo, no commit, ...): report the workspace only
        return [], f"DVC experiments not read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def experiment_refs(rows: list[dict]) -> list[tuple[str, str]]:
    """(name, rev) of every finished experiment in exp_show rows (baselines, queued, running, failed left out)."""
    out = []
    for row in rows:
        if row.get("typ") not in ("branch_commit", "branch_base"):
            continue
        if str(row.get("State") or "").lower() in ("queued", "running", "failed"):
            continue
        rev = row.get("rev")
        if rev:
            out.append((str(row.get("Experiment") or rev), str(rev)))
    return out


def stored_run(name: str, read: Reader, params_path: Path, reports: Path, *, rev: Optional[str] = None,
               where: str = ""):
    """(Run, loss history) of the files ``read`` gives (an experiment commit, an exported run
    folder), or None when they hold no evaluation results."""
    import yaml

    from dmp_core.report import resolve_params

    outputs = read_outputs(read, reports)
    if not _has_results(outputs):
        return None
    notes = []
    data = read(str(params_path))
    try:
        raw = yaml.safe_load(data) if data is not None else None
    except yaml.YAMLError:
        raw = None
    if raw is None:
        notes.append(f"no readable {params_path} in {where or name}: compared as schema defaults")
    params, note = resolve_params(raw or {}, f"{name}:{params_path}")
    if note:
        notes.append(note)
    run = _run_from_outputs([name], params, outputs, rev=rev, notes=tuple(notes))
    return run, outputs["history"]


def experiment_run(name: str, rev: str, params_path: Path, reports: Path, cwd: Optional[Path] = None):
    """The Run of one experiment commit, or None when it holds no evaluation results."""
    return stored_run(name, git_reader(rev, cwd), params_path, reports, rev=rev, where=f"commit {rev}")


# ------------------------------------------------------------------ exported runs
EXPORTED_RUN_FILES = ("params.yaml", "reports/evaluate/metrics.json")  # what makes a folder an exported run


def exported_run_dirs(root: Path) -> list[Path]:
    """``root`` when it is an exported run, else its sub-folders that are, sorted by name."""
    def is_run(folder: Path) -> bool:
        return all((folder / name).is_file() for name in EXPORTED_RUN_FILES)

    if is_run(root):
        return [root]
    folders = sorted((p for p in root.iterdir() if p.is_dir() and is_run(p)), key=lambda p: p.name) \
        if root.is_dir() else []
    if not folders:
        from dmp_core.errors import DmpError

        raise DmpError(f"report --runs {root}: no exported run there (a folder with "
                       f"{' and '.join(EXPORTED_RUN_FILES)})")
    return folders


def exported_run(folder: Path):
    """(Run, loss history) of one exported run folder, named by the folder; its commit from
    ``source.json`` where the export wrote one."""
    source = _json(disk_reader(folder)("source.json"), "source.json", []) or {}
    commit = source.get("commit")
    return stored_run(folder.name, disk_reader(folder), Path("params.yaml"), Path("reports"),
                      rev=str(commit)[:7] if commit else None, where=f"exported run {folder.name}")


# ------------------------------------------------------------------ a study's plan
PLAN = "plan.json"  # DIR/plan.json: the runs a study planned (orchestration.study.write_plan)


def plan_entries(path: Path) -> list[dict]:
    """The entries of a plan.json, ``[{"name": experiment name, "params": {dotted key: value as
    a YAML string}}]``; [] when there is no such file. ValueError when it is not such a list."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())  # json.JSONDecodeError is a ValueError
    if not isinstance(data, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("params"), dict) for e in data):
        raise ValueError('not a JSON list of {"name", "params"} entries')
    return data


def _override(value: Any) -> Any:
    """A plan's value (the text of a ``-S key=value``) as the params file holds it: parsed as YAML."""
    import yaml

    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def planned_runs(runs_dirs: tuple[Path, ...], params_path: Path, notes: list[str]):
    """The runs planned in each ``DIR/plan.json`` (:class:`dmp_core.report.PlannedRun`), each
    resolved as ``params_path`` (the report's ``--params`` file, which the study's experiments
    start from) with its overrides, by the canonical-params machinery that ``dmp study`` skips
    finished runs with; None when no DIR has a plan.json. An unreadable plan adds a note."""
    import yaml

    from dmp_core.config import apply_dotted
    from dmp_core.report import PlannedRun, resolve_params

    found: Optional[list] = None
    try:
        raw = yaml.safe_load(params_path.read_text()) if params_path.is_file() else {}
    except yaml.YAMLError:
        raw = None
    for root in runs_dirs:
        path = root / PLAN
        if not path.is_file():
            continue
        try:
            entries = plan_entries(path)
        except (OSError, ValueError) as err:
            notes.append(f"{shown_path(path)} is not a readable plan ({err}): ignored.")
            continue
        found = found if found is not None else []
        for entry in entries:
            overrides = {str(k): _override(v) for k, v in entry["params"].items()}
            params, note = resolve_params(apply_dotted(raw if isinstance(raw, dict) else {}, overrides),
                                          f"{shown_path(path)}:{entry['name']}")
            if note:
                notes.append(f"Planned run {entry['name']}: {note}.")
            found.append(PlannedRun(entry["name"], params))
        notes.append(f"Planned runs: {len(entries)} in {shown_path(path)} (the study's plan), each matched to a run "
                     f"by its method params and seed; the points with planned runs not run yet are named under the "
                     f"Verdict and in Data scaling.")
    return found


def shown_path(path: Path) -> str:
    """``path`` as the report prints it: relative to the working directory when inside it
    (no machine-dependent prefix in results.md)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


# ------------------------------------------------------------------ MLflow (fallback)
def _mlflow_client(cfg):
    """A client on the project's store, or None when its SQLite file does not exist (nothing to read)."""
    from dmp_core.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None  # opening it would create an empty store
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def find_run_ids(client, exp_name: str) -> dict[str, str]:
    """MLflow run ids per stage of one DVC experiment (tag ``dvc.exp_name``), newest first wins."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return {}
    runs = client.search_runs(exps, filter_string=f"tags.`dvc.exp_name` = '{exp_name}'",
                              order_by=["attributes.start_time DESC"])
    out: dict[str, str] = {}
    for run in runs:
        stage = run.data.tags.get("dmp.stage")
        if stage and stage not in out:
            out[stage] = run.info.run_id
    return out


def mlflow_history(client, run_id: str):
    """Loss-term metric histories of one run as a DataFrame with a ``step`` column."""
    import pandas as pd

    run = client.get_run(run_id)
    series = {}
    for key in run.data.metrics:
        if "loss" not in key:
            continue
        hist = client.get_metric_history(run_id, key)
        series[key] = pd.Series({m.step: m.value for m in hist})
    if not series:
        return None
    frame = pd.DataFrame(series).sort_index()
    frame.index.name = "step"
    return frame.reset_index()


def _fill_from_mlflow(cfg, runs: list, histories: dict, notes: list[str]) -> None:
    """Run ids and loss curves that git did not have, from the MLflow store."""
    wanting = [r for r in runs if not r.workspace and ("pretrain" not in r.run_ids or r.names[0] not in histories)]
    if not wanting:
        return
    try:
        client = _mlflow_client(cfg)
        if client is None:
            notes.append("No MLflow store found; run ids and loss curves missing from git are omitted.")
            return
        for run in wanting:
            if "pretrain" not in run.run_ids:
                run.run_ids.update({k: v for k, v in find_run_ids(client, run.names[0]).items() if k not in run.run_ids})
            if run.names[0] not in histories and run.run_ids.get("pretrain"):
                history = mlflow_history(client, run.run_ids["pretrain"])
                if history is not None:
                    histories[run.names[0]] = history
    except Exception as err:  # noqa: BLE001  (store unreachable): the tables still come from git
        notes.append(f"MLflow store not read ({type(err).__name__}); run ids and curves missing from git omitted.")


# ------------------------------------------------------------------ everything
@dataclass
class ReportInputs:
    runs: list = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    baseline_source: str = ""
    warnings: list[str] = field(default_factory=list)
    histories: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _superseded(run, runs: list):
    """The run of ``runs`` with ``run``'s params (seed included) but other results, if any: one
    seed measured twice (the code or the outputs changed in between), which the report must
    not count as two."""
    from dmp_core.report import param_diff

    return next((r for r in runs if r.models and run.models != r.models
                 and not param_diff(run.params, r.params, keep_seed=True)), None)


def _add_exported_runs(inputs: ReportInputs, roots: tuple[Path, ...]) -> None:
    """The runs exported under each root, in that order (sorted by name within one); one that
    repeats a run already read (same params and seed) with other results is left out, noted."""
    for root in roots:
        for folder in exported_run_dirs(root):
            found = exported_run(folder)
            if found is None:
                continue
            run, history = found
            twin = _superseded(run, inputs.runs)
            if twin is not None:
                inputs.notes.append(f"Exported run {shown_path(folder)} has the params and seed of {twin.name} but "
                                    f"other results: {twin.name} is reported, not the export.")
                continue
            inputs.runs.append(run)
            if history is not None and run.names[0] not in inputs.histories:
                inputs.histories[run.names[0]] = history


def _add_head_run(inputs: ReportInputs, head: dict, name: str, sha: str) -> None:
    """The HEAD commit's results as a run, unless the workspace re-ran the same params with other results.

    Same params and same results: the report merges the two rows. Same params (seed
    included) but other results: the code or the outputs changed since the commit, and
    the workspace's newer run is reported instead (a second row would count one seed twice).
    """
    run = _run_from_outputs([name], inputs.baseline, head, rev=sha)
    if _superseded(run, inputs.runs[:1]):  # the workspace
        inputs.notes.append(f"{name} has the workspace's params but other results (the code or outputs changed "
                            "since the commit): the workspace's run is reported, not the committed one.")
        return
    inputs.runs.append(run)
    if head["history"] is not None:
        inputs.histories[name] = head["history"]


def collect(cfg, reports: Path = Path("reports"), *, params_path: Path = Path("params.yaml"), num: int = -1,
            use_dvc: bool = True, use_mlflow: bool = True, runs_dirs: tuple[Path, ...] = (),
            only_runs: bool = False) -> ReportInputs:
    """Runs (workspace, HEAD, experiments, then the exports under ``runs_dirs``), the baseline,
    warnings, loss histories and notes. ``only_runs``: the exports alone, labelled by ``cfg``
    (the params file on disk), with nothing that depends on git, DVC or MLflow."""
    from dmp_core.report import canonical_params, stale_warnings

    inputs = ReportInputs()
    workspace_params = canonical_params(cfg)
    if only_runs:
        inputs.baseline, inputs.baseline_source = workspace_params, shown_path(params_path)
        _add_exported_runs(inputs, runs_dirs)
        return inputs
    outputs = read_outputs(disk_reader(), reports)
    inputs.runs.append(_run_from_outputs(["workspace"], workspace_params, outputs, workspace=True))
    if outputs["history"] is not None:
        inputs.histories["workspace"] = outputs["history"]

    inputs.baseline, inputs.baseline_source, notes = baseline_params(workspace_params, params_path)
    inputs.notes += notes
    sha = head_commit()
    if sha is not None:
        head = read_outputs(git_reader("HEAD"), reports)
        if _has_results(head):
            _add_head_run(inputs, head, f"HEAD ({sha})", sha)

    stale: list[str] = []
    if use_dvc:
        rows, why = experiment_rows(num)
        if why:
            inputs.notes.append(why + "; only the workspace and the HEAD commit are reported.")
        for name, rev in sorted(experiment_refs(rows)):
            found = experiment_run(name, rev, params_path, reports)
            if found is None:
                inputs.notes.append(f"Experiment {name} ({rev}) has no evaluation results in its commit: left out.")
                continue
            run, history = found
            inputs.runs.append(run)
            if history is not None:
                inputs.histories[name] = history
        stale, why = stale_stages()
        if why:
            inputs.notes.append(why + ".")
    _add_exported_runs(inputs, runs_dirs)
    inputs.warnings = stale_warnings(workspace_params, inputs.baseline, inputs.baseline_source, stale)
    if use_mlflow:
        _fill_from_mlflow(cfg, inputs.runs, inputs.histories, inputs.notes)
    return inputs


def _sources(runs_dirs: tuple[Path, ...], experiments: bool, only_runs: bool) -> str:
    """The runs a report reads, in words (its first sentence)."""
    exports = f"the exported runs in {', '.join(shown_path(d) for d in runs_dirs)}"
    if only_runs:
        return f"{exports} only: no workspace, HEAD commit or DVC experiment"
    read = "the workspace, the HEAD commit and every DVC experiment" if experiments else \
        "the workspace and the HEAD commit"
    return f"{read}, and {exports}" if runs_dirs else read


def regenerate_command(runs_dirs: tuple[Path, ...], params_path: Path, reports: Path) -> str:
    """The ``dmp report --only-runs`` line that writes this report again from the exports."""
    runs = " ".join(f"--runs {shown_path(d)}" for d in runs_dirs)
    return f"dmp report --only-runs {runs} --params {shown_path(params_path)} --reports {shown_path(reports)}"


def write_report(cfg, reports: Path = Path("reports"), prepared: Path = Path("data/prepared"), *,
                 params_path: Path = Path("params.yaml"), num: int = -1, experiments: bool = True,
                 notes: tuple[str, ...] = (), runs_dirs: tuple[Path, ...] = (), only_runs: bool = False) -> Path:
    """Collect everything and write reports/results.md (+ figures); return its path.

    ``notes``: lines the caller adds to the report's notes (a study's completeness);
    ``runs_dirs``: folders of exported runs read too, and the plan.json of each
    (:func:`planned_runs`); ``only_runs``: those alone (see the module docstring), without a
    gallery (exports hold no images or score matrices)."""
    from dmp_core.errors import DmpError
    from dmp_core.report import build_report, load_gallery

    runs_dirs = tuple(runs_dirs)
    if only_runs and not runs_dirs:
        raise DmpError("report --only-runs: give the exported runs with --runs DIR")
    inputs = collect(cfg, reports, params_path=params_path, num=num, use_dvc=experiments, runs_dirs=runs_dirs,
                     only_runs=only_runs)
    planned = planned_runs(runs_dirs, params_path, inputs.notes)
    scores = reports / "evaluate" / "scores.npz"
    split_dir = prepared / cfg.eval.split
    gallery = (load_gallery(scores, split_dir, dataset=cfg.data.name)
               if not only_runs and cfg.report.gallery and scores.is_file() and (split_dir / "images.npy").is_file()
               else None)
    no_gallery = ("report.gallery is false (the test images are not to be shown)" if not cfg.report.gallery else
                  f"{scores} or the prepared test split is missing")
    if only_runs:
        no_gallery = "the report is built from exported runs, which hold no images or score matrices"
        command = regenerate_command(runs_dirs, params_path, reports)
        notes = (*notes, f"Regenerate this report in any clone with `{command}`.")
    path = build_report(inputs.runs, reports, baseline=inputs.baseline, baseline_source=inputs.baseline_source,
                        warnings=inputs.warnings, histories=inputs.histories, gallery=gallery, no_gallery=no_gallery,
                        gallery_queries=cfg.report.gallery_queries,
                        include_seed_numbers=cfg.report.include_seed_numbers,
                        bootstrap_samples=cfg.report.bootstrap_samples, notes=list(notes) + inputs.notes,
                        sources=_sources(runs_dirs, experiments, only_runs), planned=planned)
    echo(f"report: {path} ({len(inputs.runs)} runs, {len(inputs.histories)} loss histories"
         + (f", {len(inputs.warnings)} warnings" if inputs.warnings else "") + ")")
    return path
