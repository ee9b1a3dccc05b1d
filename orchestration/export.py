"""``dmp report --export-runs DIR``: copy every finished DVC experiment's small results out
of its experiment commit, so that a study run in another clone (e.g. on research-use photos
that must never be committed) can be committed as plain files next to its report.

Per experiment ``DIR/<name>/`` receives its ``params.yaml`` and, under ``reports/``, the
evaluation (metrics, details with the diagnostics and chance level, per-query ranks for
the bootstrap) and both training stages' metrics and histories: numbers only, never an
image or a score matrix of the test photos."""
from __future__ import annotations

from pathlib import Path

from dmp_core.errors import DmpError
from dmp_core.io import write_bytes
from orchestration.runs import experiment_refs, experiment_rows, git_reader

EXPORTED = (
    "params.yaml",
    "reports/evaluate/metrics.json", "reports/evaluate/details.json", "reports/evaluate/ranks.npz",
    *(f"reports/{stage}/{name}" for stage in ("pretrain", "finetune")
      for name in ("metrics.json", "history.csv", "val_history.csv")),
)


def export_experiments(out: Path, num: int = -1, cwd: Path | None = None) -> list[str]:
    """Write ``out/<experiment>/<path>`` for every path of :data:`EXPORTED` that the experiment's
    commit holds; returns the experiment names. A name that exists in ``out`` with other
    content is overwritten only file by file (atomic writes), never removed."""
    rows, why = experiment_rows(num)
    if why:
        raise DmpError(f"report --export-runs: {why}")
    names = []
    for name, rev in experiment_refs(rows):
        found, read = 0, git_reader(rev, cwd)
        for path in EXPORTED:
            data = read(path)
            if data is not None:
                write_bytes(out / name / path, data)
                found += 1
        if found:
            names.append(name)
    return names
