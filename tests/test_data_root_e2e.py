"""End to end: the real dvc.yaml in a temporary git + DVC repo, with the raw dataset
OUTSIDE the repository (DVC 3 cannot track outputs there; the download stage's
manifest stands in for the folder).

- ``dvc repro preprocess`` with an absolute ``data.root`` in another temporary folder runs
  download and preprocess;
- a second call re-runs download (always) but not preprocess (the manifest's bytes are
  the same);
- one image replaced by other pixels: preprocess re-runs and the prepared array holds
  the new pixels;
- a relative ``data.root`` (``data/raw``, inside the repository) with the same files
  gives byte-identical prepared data.

A made-up dataset name (``tinyset``) exercises the open name list. The pipeline's first
stage (``params``: ``dmp check``) runs before download. Stops at preprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dmp_core", "stages", "dvc.yaml", ".dvcignore", "pyproject.toml", ".gitignore",
                 "data/raw/.gitignore"]
NAME = "tinyset"
SPLIT_OF = ["train"] * 4 + ["val"] * 2 + ["test"] * 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `python` in dvc.yaml must be this interpreter (the project's venv)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env.pop("DVC_ROOT", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode (git- and dvc-ignored) spares each stage a recompile
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "dmp-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "dmp-test@example.invalid"
    return env


def _run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _repro(repo: Path) -> str:
    return _run(repo, sys.executable, "-m", "dvc", "repro", "preprocess").stdout


def _image(k: int, shade: int = 0) -> Image.Image:
    """A 32 px PNG with a colour of its own (``shade`` makes a visibly different version)."""
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:] = (20 * k + shade, 200 - 20 * k, (90 + shade) % 256)
    arr[:16, :16] = (255 - 20 * k, 0, shade)
    return Image.fromarray(arr)


def write_tinyset(folder: Path) -> Path:
    """``<folder>/tinyset/``: dataset_tinyset.json (Karpathy format, no filepath, as
    Flickr) + 8 PNGs with 5 captions each."""
    ds = folder / NAME
    (ds / "images").mkdir(parents=True)
    entries = []
    for k, split in enumerate(SPLIT_OF):
        _image(k).save(ds / "images" / f"{k:03d}.png")
        entries.append({"filename": f"{k:03d}.png", "imgid": k, "split": split,
                        "sentences": [{"raw": f"A picture number {k}, caption {j}."} for j in range(5)]})
    (ds / f"dataset_{NAME}.json").write_text(json.dumps({"dataset": NAME, "images": entries}))
    return ds


def _set_root(repo: Path, root: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["root"] = root
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    outside = tmp_path_factory.mktemp("shared_datasets")  # not inside the repository
    dataset = write_tinyset(outside)
    repo = tmp_path_factory.mktemp("data_root_e2e") / "proj"
    repo.mkdir()
    for name in PROJECT_FILES:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    cfg = tiny_config(data__name=NAME, data__root=str(outside))
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "init", "-q")
    _run(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny project")
    return {"repo": repo, "outside": outside, "dataset": dataset}


def _prepared(repo: Path) -> dict[str, bytes]:
    out = {}
    for split in ("train", "val", "test"):
        for name in ("images.npy", "tokens.npy", "attention_mask.npy", "captions.parquet", "images.json"):
            out[f"{split}/{name}"] = (repo / "data/prepared" / split / name).read_bytes()
    out["meta.json"] = (repo / "data/prepared/meta.json").read_bytes()
    return out


def test_outside_root_runs_then_skips_then_sees_a_changed_image(setup) -> None:
    repo, dataset = setup["repo"], setup["dataset"]
    first = _repro(repo)
    for stage in ("params", "download", "preprocess"):
        assert f"Running stage '{stage}'" in first, first
    manifest = json.loads((repo / "data/manifest.json").read_text())
    assert manifest["dataset"] == NAME and manifest["counts"] == {
        "files": 8, "missing": 0, "bytes": sum(p.stat().st_size for p in (dataset / "images").iterdir())}
    assert str(setup["outside"]) not in (repo / "data/manifest.json").read_text()
    summary = json.loads((repo / "reports/preprocess/summary.json").read_text())
    assert summary["counts"]["train"]["images"] == 4 and summary["counts"]["train"]["captions"] == 20
    assert summary["skipped_total"] == 0
    manifest_bytes = (repo / "data/manifest.json").read_bytes()

    second = _repro(repo)
    assert "Running stage 'download'" in second  # always runs: the folder is outside DVC's view
    assert "Running stage 'preprocess'" not in second, second
    assert "Stage 'preprocess' didn't change" in second, second
    assert (repo / "data/manifest.json").read_bytes() == manifest_bytes

    _image(2, shade=40).save(dataset / "images" / "002.png")  # other pixels, same name
    third = _repro(repo)
    assert "Running stage 'preprocess'" in third, third
    images = np.load(repo / "data/prepared/train/images.npy")
    info = json.loads((repo / "data/prepared/train/images.json").read_text())
    row = [i["filename"] for i in info].index("002.png")
    assert np.array_equal(images[row], np.asarray(_image(2, shade=40)))


def test_relative_root_inside_the_repo_gives_the_same_data(setup) -> None:
    repo, dataset = setup["repo"], setup["dataset"]
    absolute = _prepared(repo) if (repo / "data/prepared/meta.json").is_file() else None
    if absolute is None:
        _repro(repo)
        absolute = _prepared(repo)
    shutil.copytree(dataset, repo / "data" / "raw" / NAME)  # git-ignored by data/raw/.gitignore
    assert not _run(repo, "git", "status", "--porcelain", "data/raw").stdout.strip()
    _set_root(repo, "data/raw")
    out = _repro(repo)
    assert "Running stage 'preprocess'" in out, out  # data.root is a param of preprocess
    assert _prepared(repo) == absolute  # identical inputs, identical outputs
    again = _repro(repo)
    assert "Running stage 'preprocess'" not in again, again
