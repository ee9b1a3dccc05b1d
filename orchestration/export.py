"""``dmp report --export-runs DIR`` and a study's export of each run as it finishes: copy a
finished DVC experiment's small results out of its experiment commit, so that a study run
in another clone (e.g. on research-use photos that must never be committed) can be
committed as plain files next to its report, and so that an interrupted study keeps every
run that finished.

Per experiment ``DIR/<name>/`` receives its ``params.yaml`` and, under ``reports/``, the
evaluation (metrics, details with the diagnostics and chance level, per-query ranks for
the bootstrap) and both training stages' metrics and histories: numbers only, never an
image or a score matrix of the test photos. :func:`export_experiment` (one experiment, what
``dmp study`` calls as each run finishes) also writes ``DIR/<name>/source.json``: the
experiment's commit and its baseline commit, and nothing else (no time), so exporting the
same experiment twice writes the same bytes.

A folder of ``DIR`` with ``params.yaml`` and ``reports/evaluate/metrics.json`` is a finished
run: ``dmp study`` does not run a planned experiment again when such a folder has the
same method params and seed (:func:`finished_runs`, :func:`orchestration.study.skip_finished`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dmp_core.errors import DmpError
from dmp_core.io import write_bytes, write_text
from orchestration.runs import EXPORTED_RUN_FILES, experiment_refs, experiment_rows, git_bytes, git_reader

EXPORTED = (
    "params.yaml",
    "reports/preprocess/summary.json",  # the split sizes (which images each stage saw); DVC-cached, not in git
    "reports/evaluate/metrics.json", "reports/evaluate/details.json", "reports/evaluate/ranks.npz",
    *(f"reports/{stage}/{name}" for stage in ("pretrain", "finetune")
      for name in ("metrics.json", "history.csv", "val_history.csv")),
)
DVC_TRACKED = ("reports/preprocess/summary.json",)  # exported from the DVC cache
SOURCE = "source.json"  # provenance of a run exported by export_experiment: commit shas only


def _copy(out: Path, name: str, rev: str, cwd: Path | None) -> int:
    """Copy the :data:`EXPORTED` files of commit ``rev`` to ``out/name/``; the number copied."""
    found, read = 0, git_reader(rev, cwd)
    for path in EXPORTED:
        data = read(path)
        if data is not None:
            write_bytes(out / name / path, data)
            found += 1
    return found


def export_experiments(out: Path, num: int = -1, cwd: Path | None = None) -> list[str]:
    """Write ``out/<experiment>/<path>`` for every path of :data:`EXPORTED` that the experiment's
    commit holds; returns the experiment names. A name that exists in ``out`` with other
    content is overwritten only file by file (atomic writes), never removed."""
    rows, why = experiment_rows(num)
    if why:
        raise DmpError(f"report --export-runs: {why}")
    return [name for name, rev in experiment_refs(rows) if _copy(out, name, rev, cwd)]


def _git_line(*args: str, cwd: Path | None = None) -> Optional[str]:
    out = git_bytes(*args, cwd=cwd)
    return out.decode().strip() if out else None


def head_sha(cwd: Path | None = None) -> Optional[str]:
    """The full sha of HEAD (None: no commit, no repository)."""
    return _git_line("rev-parse", "--verify", "--quiet", "HEAD^{commit}", cwd=cwd)


def experiment_commit(name: str, baseline: str = "HEAD", cwd: Path | None = None) -> Optional[str]:
    """The commit of DVC experiment ``name`` of ``baseline`` (its ref
    ``refs/exps/<sha[:2]>/<sha[2:]>/<name>``), or None when there is none (not finished, failed)."""
    sha = _git_line("rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}", cwd=cwd)
    if not sha:
        return None
    return _git_line("rev-parse", "--verify", "--quiet", f"refs/exps/{sha[:2]}/{sha[2:]}/{name}^{{commit}}", cwd=cwd)


def dvc_cached(path: str, commit: str, cwd: Path | None = None) -> Optional[bytes]:
    """``path`` as DVC tracks it at ``commit`` (an output that is in the DVC cache, not in git),
    or None when this clone's cache does not hold it."""
    import dvc.api

    try:
        return dvc.api.read(path, rev=commit, repo=str(cwd or Path.cwd()), mode="rb")
    except Exception:  # noqa: BLE001 - not tracked, not cached, no remote: the export goes without it
        return None


def export_experiment(out: Path, name: str, rev: Optional[str] = None, *, baseline: str = "HEAD",
                      cwd: Path | None = None) -> Optional[Path]:
    """Export ONE experiment: its :data:`EXPORTED` files and :data:`SOURCE` (``{"experiment",
    "commit", "baseline"}``: full shas) to ``out/name/``; returns that folder, or None when
    the experiment has no commit (``rev`` None: looked up by name for ``baseline``) or its
    commit holds no results (nothing is written then)."""
    rev = rev or experiment_commit(name, baseline, cwd)
    commit = _git_line("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=cwd) if rev else None
    read = git_reader(commit, cwd) if commit else None
    if read is None or read(EXPORTED_RUN_FILES[1]) is None:
        return None
    for path in EXPORTED:  # the folder holds exactly this commit's files (another run of the name may be there)
        data = read(path)
        if data is None and path in DVC_TRACKED:
            data = dvc_cached(path, commit, cwd)
        if data is not None:
            write_bytes(out / name / path, data)
        elif (out / name / path).is_file():
            (out / name / path).unlink()
    parent = _git_line("rev-parse", "--verify", "--quiet", f"{commit}^1", cwd=cwd)  # a DVC experiment's baseline
    write_text(out / name / SOURCE, json.dumps({"experiment": name, "commit": commit, "baseline": parent},
                                               indent=2, sort_keys=True) + "\n")
    return out / name


@dataclass(frozen=True)
class FinishedRun:
    """An exported run folder: its name, canonical params (``dmp_core.report.resolve_params``)
    and the note resolving them gave (an older schema's params file), if any."""

    name: str
    params: dict
    note: Optional[str] = None

    @property
    def key(self) -> tuple:
        """(method params, seed): what makes two runs the same run of the same method."""
        from dmp_core.report.runs import method_params

        return method_params(self.params), self.params.get("seed")

    def source(self, out: Path) -> dict:
        try:
            return json.loads((out / self.name / SOURCE).read_text())
        except (OSError, ValueError):
            return {}


def finished_runs(out: Path) -> list[FinishedRun]:
    """Every folder of ``out`` with :data:`EXPORTED_RUN_FILES`, its params resolved as the report does
    (schema defaults fill absent keys: a run made before a key existed has its default)."""
    import yaml

    from dmp_core.report import resolve_params

    runs = []
    for folder in sorted(p for p in out.glob("*") if p.is_dir()) if out.is_dir() else []:
        if not all((folder / f).is_file() for f in EXPORTED_RUN_FILES):
            continue
        try:
            raw = yaml.safe_load((folder / "params.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        params, note = resolve_params(raw if isinstance(raw, dict) else {}, f"{folder}/params.yaml")
        runs.append(FinishedRun(folder.name, params, note))
    return runs
