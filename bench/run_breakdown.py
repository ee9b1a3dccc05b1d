"""Where one run's wall time goes, from its exported files (no re-run).

    python bench/run_breakdown.py reports/photos/runs/pts-denoising-f100-s0 [more run folders]

Per training stage, ``reports/<stage>/metrics.json`` records the stage's wall time and its
pairs/s over the optimiser steps alone (``pairs_seen / train_time``: forward, backward,
optimiser and the wait for the next batch). So steps x batch / pairs_per_s is the time in
optimiser steps, and the rest of the wall time is the val checks (``val_history.csv``
rows), the checkpoint writes and the stage's set-up (model and tower loading, MLflow).
The evaluate stage records its own wall time (``eval_seconds`` in details.json: the
re-ranker's refit and val choice, the test split's scoring and the diagnostics, for both
models). The data stages run once per study clone and are restored from DVC's run cache
for every later run, so they are not part of a run's cost. Prints one markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import yaml


def breakdown(run: Path) -> dict[str, object]:
    params = yaml.safe_load((run / "params.yaml").read_text()) or {}
    row: dict[str, object] = {"run": run.name}
    total = 0.0
    for stage in ("pretrain", "finetune"):
        metrics = json.loads((run / "reports" / stage / "metrics.json").read_text())
        batch = int((params.get(stage) or {}).get("batch_size", 32))
        steps_s = metrics["steps"] * batch / metrics["pairs_per_s"]
        vals = len(pd.read_csv(run / "reports" / stage / "val_history.csv"))
        row[f"{stage} steps s"] = round(steps_s)
        row[f"{stage} s/step"] = round(steps_s / metrics["steps"], 2)
        row[f"{stage} val checks"] = vals
        row[f"{stage} val + ckpt + set-up s"] = round(metrics["wall_time_s"] - steps_s)
        total += metrics["wall_time_s"]
    details = json.loads((run / "reports" / "evaluate" / "details.json").read_text())
    row["evaluate s"] = details.get("eval_seconds")
    row["total s"] = round(total + float(details.get("eval_seconds") or 0))
    return row


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    print(pd.DataFrame([breakdown(Path(p)) for p in paths]).to_markdown(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
