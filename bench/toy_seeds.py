"""The toy learning test over many seeds: the table behind its floors (bench/README.md).

Runs ``tests/test_learning.py::train_and_measure`` for each seed in its own process with
one torch thread (as the test does), ``--jobs`` at a time, and prints one markdown row per
seed. Extra ``key=value`` arguments override the toy's settings (dotted keys as
``pretrain__lr=1e-3``; ``steps=400`` changes the run length).

    python bench/toy_seeds.py --seeds 10 --jobs 2
    python bench/toy_seeds.py --seeds 10 --jobs 16 steps=400 pretrain__fusion_lr_hold=0.6
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

from _overrides import parse_overrides  # bench/_overrides.py (this script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _run(job):
    seed, overrides = job
    import torch
    from test_learning import train_and_measure  # (its conftest import sets 2 threads)

    torch.set_num_threads(1)  # as the test's fixture does: the outcome depends on the thread count

    start = time.perf_counter()
    result = train_and_measure(blank=False, seed=seed, **overrides)
    return seed, result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value settings of the toy run")
    args = parser.parse_args()
    overrides = parse_overrides(parser, args.overrides)
    jobs = [(seed, overrides) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = sorted(pool.map(_run, jobs), key=lambda row: row[0])
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, overrides {overrides}")
    print("| seed | ITM AUC | image-use gap (nats) | seconds |")
    print("|---|---|---|---|")
    for seed, result, seconds in results:
        print(f"| {seed} | {result['itm_auc']:.3f} | {result['image_use_gap']:.3f} | {seconds:.0f} |")
    aucs = [r["itm_auc"] for _, r, _ in results]
    gaps = [r["image_use_gap"] for _, r, _ in results]
    print(f"min ITM AUC {min(aucs):.3f}, mean {sum(aucs) / len(aucs):.3f}; "
          f"min gap {min(gaps):.3f}, mean {sum(gaps) / len(gaps):.3f}")


if __name__ == "__main__":
    main()
