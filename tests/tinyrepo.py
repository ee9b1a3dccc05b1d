"""A tiny copy of the project as its own git + DVC repository, for the end-to-end tests
(tests/test_workflow_e2e.py, tests/test_cluster_e2e.py): the real dvc.yaml, stages and
library, with the lean params.yaml plus the tiny settings written by DVC's own
``-S ++key=value`` writer, as a user would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dmp_core", "orchestration", "stages", "dvc.yaml", ".dvcignore", "pyproject.toml", "params.yaml",
                 ".gitignore"]
# the smallest run that still exercises every stage: 32 px, 48 training images x 2 captions,
# 6 + 4 optimiser steps (one epoch of pretraining: the scaling step needs whole epochs),
# two val checks and checkpoints per training stage, a 16-image test split, ITM re-ranking
# of the top 8, small diagnostics. Evaluation batch sizes keep their defaults (one batch).
TINY_SETTINGS = [
    "data.image_size=32", "++data.max_tokens=16",
    "++data.synthetic.n_train=48", "++data.synthetic.n_val=16", "++data.synthetic.n_test=16",
    "++data.synthetic.captions_per_image=2",
    "pretrain.steps=6", "pretrain.batch_size=8", "++pretrain.num_workers=0", "++pretrain.checkpoint_every=3",
    "++pretrain.val_every=3", "++pretrain.log_every=1",
    "finetune.steps=4", "++finetune.batch_size=8", "++finetune.num_workers=0", "++finetune.checkpoint_every=2",
    "++finetune.val_every=2", "++finetune.log_every=1",
    "eval.k_test=8", "++eval.diag_queries=8", "++eval.diag_pairs=8", "++eval.rerank_fit_steps=20",
    "++eval.rerank_fit_every=10",
    "++tracking.system_metrics=false", "++report.bootstrap_samples=100", "++report.gallery_queries=2",
]


def test_env() -> dict[str, str]:
    """The environment of every command the end-to-end tests run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "MLFLOW_TRACKING_URI", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "DMP_"))}
    # `python` in dvc.yaml must be this interpreter (the project's venv); bytecode is
    # written (git- and dvc-ignored) so that each of the ~50 stage processes does not
    # recompile the project's modules
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
            "GIT_AUTHOR_NAME": "dmp-test", "GIT_COMMITTER_NAME": "dmp-test",
            "GIT_AUTHOR_EMAIL": "dmp-test@example.invalid", "GIT_COMMITTER_EMAIL": "dmp-test@example.invalid"}
    return env


test_env.__test__ = False  # a helper, not a test


def make_tiny_project(repo: Path, settings: Sequence[str] = TINY_SETTINGS) -> Path:
    """Copy the project into ``repo`` (created), apply ``settings``, ``git init``, ``dvc init``, commit."""
    from dvc.utils.hydra import apply_overrides

    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    apply_overrides(repo / "params.yaml", list(settings))  # what `dvc exp run -S` writes
    env = test_env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo
