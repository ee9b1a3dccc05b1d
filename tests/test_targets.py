"""Pixel targets, the ``targets`` stage (run_targets) and its ``dmp targets`` command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import dmp_core.targets as targets_mod
from dmp_core.errors import DataError, DmpError
from dmp_core.targets import hog, pixel_targets, run_targets, target_dim
from stages.cli import app

from conftest import tiny_config


# ----------------------------------------------------------------------------- pixel targets
def _pixel_reference(img_chw: np.ndarray, patch: int, norm: bool, eps: float = 1e-6) -> np.ndarray:
    """Patches row-major; inside a patch (row, col, channel); optional per-patch z-score."""
    channels, height, width = img_chw.shape
    out = []
    for pr in range(height // patch):
        for pc in range(width // patch):
            vec = np.array(
                [
                    img_chw[ch, pr * patch + r, pc * patch + c]
                    for r in range(patch)
                    for c in range(patch)
                    for ch in range(channels)
                ],
                dtype=np.float64,
            )
            if norm:
                vec = (vec - vec.mean()) / np.sqrt(vec.var() + eps)
            out.append(vec)
    return np.stack(out)


@pytest.mark.parametrize("norm", [False, True])
def test_pixel_targets_match_bruteforce(norm):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 24), dtype=np.uint8))
    out = pixel_targets(images, patch=8, norm_per_patch=norm)
    assert out.shape == (2, 6, 8 * 8 * 3)
    for b in range(2):
        ref = _pixel_reference(images[b].numpy() / 255.0, 8, norm)
        assert np.abs(out[b].numpy() - ref).max() < 1e-5
    if not norm:
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    else:
        assert torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5)


def test_pixel_targets_uint8_equals_float_and_flat_patch_is_finite():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    assert torch.equal(pixel_targets(images, patch=4), pixel_targets(images.float() / 255, patch=4))
    normed = pixel_targets(images, patch=4, norm_per_patch=True)
    assert torch.isfinite(normed).all() and torch.all(normed == 0)


def test_pixel_targets_bad_size():
    with pytest.raises(DmpError, match="not divisible by patch=8"):
        pixel_targets(torch.rand(1, 3, 20, 16), patch=8)


def test_target_dim_matches_outputs():
    cfg = tiny_config(targets__hog__bins=6)
    x = torch.rand(1, 3, 32, 32)
    assert target_dim("hog", cfg) == hog(x, patch=8, cell=4, bins=6).shape[-1] == 3 * 6 * 4
    assert target_dim("pixel", cfg) == pixel_targets(x, patch=8).shape[-1] == 192


# ----------------------------------------------------------------------------- run_targets
def _prepare(root: Path, sizes: dict[str, int], side: int = 32, seed: int = 0) -> Path:
    """Write <root>/prepared/<split>/images.npy (uint8 [N, side, side, 3])."""
    rng = np.random.default_rng(seed)
    prepared = root / "prepared"
    for split, n in sizes.items():
        (prepared / split).mkdir(parents=True)
        np.save(prepared / split / "images.npy", rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return prepared


def test_run_targets_writes_float16_arrays_and_sidecar(tmp_path):
    prepared = _prepare(tmp_path, {"train": 5, "val": 3, "test": 4})
    cfg = tiny_config(targets__batch_size=2, targets__pixel__norm_per_patch=True)
    out = tmp_path / "targets"
    summary = run_targets(cfg, prepared_dir=prepared, out_dir=out)

    assert set(summary["splits"]) == {"train", "val", "test"}
    for split, n in (("train", 5), ("val", 3), ("test", 4)):
        images = torch.from_numpy(np.load(prepared / split / "images.npy")).permute(0, 3, 1, 2)
        hog_arr = np.load(out / split / "hog.npy")
        pix_arr = np.load(out / split / "pixel.npy")
        assert hog_arr.dtype == np.float16 and pix_arr.dtype == np.float16
        assert hog_arr.shape == (n, 16, 3 * 9 * 4)
        assert pix_arr.shape == (n, 16, 8 * 8 * 3)
        # the same numbers as the functions, whatever the batching
        expected_hog = hog(images, patch=8, cell=4, bins=9, grad="sobel", angle="maskfeat").numpy()
        expected_pix = pixel_targets(images, patch=8, norm_per_patch=True).numpy()
        assert np.abs(hog_arr.astype(np.float32) - expected_hog).max() < 1e-3
        assert np.abs(pix_arr.astype(np.float32) - expected_pix).max() < 1e-2

        sidecar = json.loads((out / split / "targets.json").read_text())
        assert sidecar["patch"] == 8
        assert sidecar["hog"] == {"cell": 4, "bins": 9, "grad": "sobel", "angle": "maskfeat", "eps": 1e-5}
        assert sidecar["pixel"]["norm_per_patch"] is True
        assert sidecar["shapes"] == {"hog": [n, 16, 108], "pixel": [n, 16, 192]}
        assert sidecar["dtype"] == "float16" and sidecar["num_images"] == n
        assert sidecar["image_size"] == [32, 32]
        assert summary["splits"][split]["shapes"] == sidecar["shapes"]
    assert not list(out.rglob("*.tmp"))


def test_run_targets_only_requested_kinds_and_present_splits(tmp_path):
    prepared = _prepare(tmp_path, {"train": 3})
    out = tmp_path / "targets"
    run_targets(tiny_config(), prepared_dir=prepared, out_dir=out)
    assert (out / "train" / "pixel.npy").is_file()
    # a rerun with fewer kinds removes the stale array so the folder matches its sidecar
    cfg = tiny_config(targets__kinds=["hog"], targets__hog__grad="central", targets__hog__angle="skimage")
    summary = run_targets(cfg, prepared_dir=prepared, out_dir=out)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["hog.npy", "targets.json"]
    assert list(summary["splits"]) == ["train"]
    sidecar = json.loads((out / "train" / "targets.json").read_text())
    assert sidecar["kinds"] == ["hog"] and sidecar["hog"]["grad"] == "central"


def test_run_targets_repeated_kind_is_written_once(tmp_path):
    prepared = _prepare(tmp_path, {"val": 2})
    run_targets(tiny_config(targets__kinds=["hog", "hog"]), prepared_dir=prepared, out_dir=tmp_path / "t")
    arr = np.load(tmp_path / "t" / "val" / "hog.npy")
    images = torch.from_numpy(np.load(prepared / "val" / "images.npy")).permute(0, 3, 1, 2)
    assert np.abs(arr.astype(np.float32) - hog(images, patch=8, cell=4).numpy()).max() < 1e-3
    assert json.loads((tmp_path / "t" / "val" / "targets.json").read_text())["kinds"] == ["hog"]


def test_run_targets_crash_leaves_no_partial_files(tmp_path, monkeypatch):
    prepared = _prepare(tmp_path, {"train": 6})
    calls = {"n": 0}
    real_hog = targets_mod.hog

    def flaky_hog(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-write")
        return real_hog(*args, **kwargs)

    monkeypatch.setattr(targets_mod, "hog", flaky_hog)
    out = tmp_path / "targets"
    with pytest.raises(RuntimeError, match="killed mid-write"):
        run_targets(tiny_config(targets__batch_size=2), prepared_dir=prepared, out_dir=out)
    assert calls["n"] == 2  # the first batch had been written to the temporary file
    assert list((out / "train").iterdir()) == []  # no array, no sidecar, no temporary file


def test_run_targets_bad_image_size_names_file_and_key(tmp_path):
    prepared = _prepare(tmp_path, {"train": 2}, side=30)
    with pytest.raises(DataError, match=r"images\.npy: image size 30x30 is not divisible by targets\.patch=8") as info:
        run_targets(tiny_config(), prepared_dir=prepared, out_dir=tmp_path / "targets")
    assert "\n" not in str(info.value)


def test_run_targets_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no <split>/images.npy"):
        run_targets(tiny_config(), prepared_dir=tmp_path / "nowhere", out_dir=tmp_path / "targets")
    bad = tmp_path / "prepared" / "train"
    bad.mkdir(parents=True)
    np.save(bad / "images.npy", np.zeros((2, 32, 32), dtype=np.float32))
    with pytest.raises(DataError, match=r"expected uint8 \[N, H, W, 3\], got float32 \[2, 32, 32\]"):
        run_targets(tiny_config(), prepared_dir=tmp_path / "prepared", out_dir=tmp_path / "targets")


# ----------------------------------------------------------------------------- CLI
def _params_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**overrides).model_dump(mode="json")))
    return path


def test_cli_help():
    result = CliRunner().invoke(app, ["targets", "--help"])
    assert result.exit_code == 0
    assert "--params" in result.output and "--prepared" in result.output


def test_cli_runs_targets(tmp_path):
    prepared = _prepare(tmp_path, {"train": 3, "val": 2})
    out = tmp_path / "targets"
    params = _params_file(tmp_path, targets__kinds=["pixel"])
    args = ["targets", "--params", str(params), "--prepared", str(prepared), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train 3 images (pixel 16x192)" in result.output
    assert np.load(out / "val" / "pixel.npy").shape == (2, 16, 192)


def test_cli_error_is_one_line(tmp_path):
    prepared = _prepare(tmp_path, {"train": 1}, side=36)
    params = _params_file(tmp_path)
    args = ["targets", "--params", str(params), "--prepared", str(prepared), "--out", str(tmp_path / "t")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmp targets: error: ") and "targets.patch=8" in lines[0]
