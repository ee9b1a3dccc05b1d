"""Shared fixtures: tiny configurations and a tiny prepared synthetic dataset.

Everything is built in temporary folders; no test touches the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# `make test` runs the suite in two pytest-xdist workers (one file per worker at a time):
# each worker, and every stage process it spawns, gets its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# DVC binds its console logger to the sys.stdout of the moment it is first imported: here,
# the session's stream, not the capture of whichever test imports it first (a capsys
# stream is closed after its test, and DVC's next log line would fail on it)
import dvc  # noqa: E402,F401
import torch  # noqa: E402

from dmp_core.config import Config, config_from_dict  # noqa: E402

torch.set_num_threads(THREADS)

TINY = {
    "seed": 0,
    "data": {
        "image_size": 32,
        "max_tokens": 16,
        "synthetic": {"n_train": 48, "n_val": 16, "n_test": 16, "captions_per_image": 2},
    },
    "targets": {"patch": 8, "hog": {"cell": 4}},
    "model": {"preset": "tiny", "patch_size": 8},
    "objective": {"vicreg_coeffs": {"expander_dim": 64}},
    "pretrain": {"steps": 6, "batch_size": 8, "num_workers": 0, "checkpoint_every": 2, "log_every": 1},
    "finetune": {"steps": 6, "batch_size": 8, "num_workers": 0, "checkpoint_every": 2, "log_every": 1},
    "eval": {"k_test": 8, "batch_size": 16, "itm_batch_size": 32, "rerank_fit_steps": 20, "rerank_fit_every": 10},
    "tracking": {"system_metrics": False},
}


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo rendezvous, mlflow server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(**overrides) -> Config:
    """The TINY dict with nested overrides (``section__key=value``) applied, validated."""
    from dmp_core.config import apply_dotted

    return config_from_dict(apply_dotted(TINY, {k.replace("__", "."): v for k, v in overrides.items()}))


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """download -> preprocess -> targets on the TINY config, once per session.

    Returns the folders: raw, prepared, targets, reports. Read-only for tests."""
    from dmp_core.data.download import run_download
    from dmp_core.data.preprocess import run_preprocess
    from dmp_core.targets import run_targets

    root = tmp_path_factory.mktemp("tiny_data")
    cfg = tiny_config(data__root=str(root / "raw"))
    raw = run_download(cfg)
    prepared = root / "prepared"
    reports = root / "reports"
    run_preprocess(cfg, raw_dir=raw, out_dir=prepared, reports_dir=reports / "preprocess")
    targets = root / "targets"
    run_targets(cfg, prepared_dir=prepared, out_dir=targets)
    return {"raw": raw, "prepared": prepared, "targets": targets, "reports": reports, "root": root}


@pytest.fixture
def one_thread():
    """One torch thread for the test (the learning toys' outcomes were measured so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
