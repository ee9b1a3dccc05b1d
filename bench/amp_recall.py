"""Does bf16 autocast change what pretraining learns? Validation recall, fp32 vs bf16, over seeds.

Builds the embedded synthetic set (download -> preprocess -> targets) in a scratch folder,
then pretrains the same config with ``pretrain.amp=off`` and ``pretrain.amp=bf16`` for each
seed, ``--jobs`` runs at a time with ``--threads`` torch threads each, and prints the best
validation ITC R-mean, the pretraining wall time and whether bf16 ran, one row per run.
Runs are untracked (the figure is recall, not tracking; this also runs where mlflow is not
installed). Extra ``key=value`` arguments are dotted config overrides.

    python bench/amp_recall.py --seeds 3 --jobs 6 --threads 2 pretrain.steps=500
"""
from __future__ import annotations

import argparse
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _overrides import parse_overrides  # bench/_overrides.py (this script's folder is on sys.path)


def _config(overrides: dict, root: Path, seed: int = 0, amp: str = "off"):
    from dmp_core.config import Config, apply_dotted, config_from_dict

    raw = apply_dotted(Config().model_dump(mode="json"), {**overrides, "data.root": str(root / "raw"),
                                                          "seed": seed, "pretrain.amp": amp})
    return config_from_dict(raw, source="bench amp_recall")


def _prepare(overrides: dict, root: Path) -> None:
    from dmp_core.data.download import run_download
    from dmp_core.data.preprocess import run_preprocess
    from dmp_core.targets import run_targets

    cfg = _config(overrides, root)
    run_preprocess(cfg, run_download(cfg), root / "prepared", root / "reports" / "preprocess")
    run_targets(cfg, root / "prepared", root / "targets")


def _pretrain(overrides: dict, root: Path, seed: int, amp: str, threads: int) -> dict:
    """One run, in this process (the ``--one`` mode that :func:`main` starts per job)."""
    import torch

    torch.set_num_threads(threads)
    import dmp_core.tracking as tracking
    from dmp_core.training.loop import run_training, use_bf16

    tracking.Tracker = lambda *args, **kwargs: tracking.NullTracker()  # untracked runs
    name = f"{amp}-s{seed}"
    cfg = _config(overrides, root, seed, amp)
    start = time.perf_counter()
    metrics = run_training(cfg, "pretrain", prepared_dir=root / "prepared",
                           targets_dir=root / "targets", out_dir=root / "models" / name,
                           reports_dir=root / "reports" / name, progress=False)
    return {"amp": amp, "seed": seed, "r_mean": metrics["val_r_mean_best"], "seconds": time.perf_counter() - start,
            "bf16": use_bf16(amp, torch.device("cpu"), cfg.model.preset)}


def _launch(args: argparse.Namespace, root: Path, seed: int, amp: str) -> dict:
    """A run in a child process of its own (the training loop starts loader workers itself)."""
    cmd = [sys.executable, __file__, "--one", amp, str(seed), "--root", str(root), "--threads", str(args.threads),
           *args.overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{amp} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("AMP", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args()
    overrides = parse_overrides(parser, args.overrides)
    if args.one:
        print(json.dumps(_pretrain(overrides, args.root, int(args.one[1]), args.one[0], args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="dmp-amp-") as tmp:
        root = Path(tmp)
        _prepare(overrides, root)
        jobs = [(seed, amp) for seed in range(args.seeds) for amp in ("off", "bf16")]
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda job: _launch(args, root, *job), jobs))
    from dmp_core.training.loop import cpu_has_native_bf16

    print(f"# overrides {overrides}; CPU native bf16: {cpu_has_native_bf16()}; {args.threads} thread(s) per run")
    print("| amp | seed | best val R-mean | pretrain wall s | bf16 ran |")
    print("|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["amp"], r["seed"])):
        print(f"| {row['amp']} | {row['seed']} | {row['r_mean']:.2f} | {row['seconds']:.0f} | {row['bf16']} |")
    for amp in ("off", "bf16"):
        values = [r["r_mean"] for r in rows if r["amp"] == amp]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{amp}: R-mean {statistics.mean(values):.2f} +- {spread:.2f} (mean +- std over {len(values)} seeds)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
