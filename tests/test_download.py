"""Download and validation on local fixtures only: a 127.0.0.1 HTTP server with Range
support, file:// URLs and a local folder laid out like the hub (DMP_HUB_MIRROR)."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY, tiny_config
from dmp_core.data import download as dl
from dmp_core.data.download import Source, ImageArchive, fetch_url, run_download, validate_dataset
from dmp_core.errors import DataError

BLOB = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    honour_range = True
    seen_ranges: list = []

    def do_GET(self):  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng and self.honour_range else 0
        body = BLOB[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.seen_ranges = []
    _Handler.honour_range = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_resumes_with_range_and_verifies(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:300_000])  # left by an interrupted run
    fetch_url(server, dest, sha256=hashlib.sha256(BLOB).hexdigest())
    assert _Handler.seen_ranges == ["bytes=300000-"]
    assert dest.read_bytes() == BLOB and not (tmp_path / "blob.bin.part").exists()


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    _Handler.honour_range = False
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes")
    fetch_url(server, tmp_path / "blob.bin", md5=hashlib.md5(BLOB).hexdigest())
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_fetch_checksum_mismatch(server, tmp_path):
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_url(server, tmp_path / "blob.bin", sha256="0" * 64)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_fetch_file_url_resumes(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "copy.bin.part").write_bytes(BLOB[:1000])
    fetch_url(src.as_uri(), tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == BLOB


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _jpeg_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (100, 50, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _karpathy_doc(names):
    splits = ["train", "restval", "val", "test"]
    return {"images": [{"filename": n, "split": splits[i % 4], "sentences": [{"raw": f"picture {i}"}]}
                       for i, n in enumerate(names)]}


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """Karpathy zip behind a file:// URL (after a failing mirror) and images in a hub-layout folder."""
    names = [f"{k}.jpg" for k in range(8)]
    src = tmp_path / "sources"
    src.mkdir()
    split_zip = _zip(src / "caption_datasets.zip", {
        "dataset_flickr30k.json": json.dumps(_karpathy_doc(names)).encode(),
        "dataset_coco.json": b"{}",
    })
    mirror = tmp_path / "hub"
    (mirror / "nlphuji" / "flickr30k").mkdir(parents=True)
    members = {f"flickr30k-images/{n}": _jpeg_bytes() for n in names}
    members["__MACOSX/flickr30k-images/._0.jpg"] = b"resource fork"
    members["flickr30k-images/readme.txt"] = b"not an image"
    _zip(mirror / "nlphuji" / "flickr30k" / "flickr30k-images.zip", members)
    monkeypatch.setenv("DMP_HUB_MIRROR", str(mirror))
    monkeypatch.setattr(dl, "KARPATHY_SOURCES", (
        Source(url=(src / "missing.zip").as_uri()),  # a dead mirror: the next one is tried
        Source(url=split_zip.as_uri(), sha256=hashlib.sha256(split_zip.read_bytes()).hexdigest()),
    ))
    return tmp_path


def test_real_dataset_download_then_validate_only(fake_sources, monkeypatch):
    cfg = tiny_config(data__name="flickr30k", data__root=str(fake_sources / "raw"))
    root = run_download(cfg)  # HF_HUB_OFFLINE=1 is set: only local sources are allowed, and used
    assert root == fake_sources / "raw" / "flickr30k"
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{k}.jpg" for k in range(8)]
    report = validate_dataset(root, "flickr30k")
    assert report["splits"] == {"train": {"images": 4, "captions": 4}, "val": {"images": 2, "captions": 2},
                                "test": {"images": 2, "captions": 2}}
    assert not (root / "downloads").exists()

    def no_fetch(*a, **k):
        raise AssertionError("present data must not be fetched again")

    monkeypatch.setattr(dl, "fetch", no_fetch)
    assert run_download(cfg) == root


def test_missing_real_data_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DMP_HUB_MIRROR", raising=False)
    cfg = tiny_config(data__name="flickr30k", data__root=str(tmp_path))
    with pytest.raises(DataError) as exc:
        run_download(cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(tmp_path / "flickr30k" / "dataset_flickr30k.json") in msg
    assert str(tmp_path / "flickr30k" / "images") in msg and "HF_HUB_OFFLINE" in msg


def test_failed_download_names_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps(_karpathy_doc(["a.jpg"])))
    monkeypatch.setattr(dl, "IMAGE_SOURCES", {"coco": (ImageArchive(Source(url=(tmp_path / "nope.zip").as_uri()),
                                                                    subdir="train2014"),)})
    with pytest.raises(DataError) as exc:
        run_download(tiny_config(data__name="coco", data__root=str(tmp_path)))
    msg = str(exc.value)
    assert "download failed" in msg and "nope.zip" in msg and "dataset_coco.json (" not in msg
    assert not any(p.name.startswith(".images") for p in (tmp_path / "coco").iterdir())


def test_validation_of_present_data(tmp_path, capsys):
    cfg = tiny_config(data__root=str(tmp_path), data__synthetic__n_train=8, data__synthetic__n_test=8)
    root = run_download(cfg)
    (root / "images" / "val_00003.png").unlink()
    with pytest.raises(DataError, match=r"val_00003\.png: image file not found \(images\[11\].*1 of 32"):
        validate_dataset(root, "synthetic", "error")
    report = validate_dataset(root, "synthetic", "skip")
    assert report["missing_files"] == 1 and "preprocess will skip" in capsys.readouterr().err


# ---------------------------------------------------------------------------- CLI
def _params(tmp_path, **data):
    raw = json.loads(json.dumps(TINY))
    raw["data"].update(root=str(tmp_path / "raw"), **data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_download_and_preprocess(tmp_path):
    from stages.cli import app

    runner = CliRunner()
    for cmd in ("download", "preprocess"):
        assert runner.invoke(app, [cmd, "--help"]).exit_code == 0
    params = _params(tmp_path)
    manifest = tmp_path / "manifest.json"
    res = runner.invoke(app, ["download", "--params", str(params), "--manifest", str(manifest),
                              "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "download: synthetic" in res.output and "train 48 images/96 captions" in res.output
    assert "manifest" in res.output and json.loads(manifest.read_text())["counts"]["files"] == 80
    res = runner.invoke(app, ["preprocess", "--params", str(params), "--out", str(tmp_path / "prep"),
                              "--reports", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "0 items skipped" in res.output and (tmp_path / "prep" / "test" / "tokens.npy").is_file()


def test_cli_error_is_one_line(tmp_path):
    from stages.cli import app

    res = CliRunner().invoke(app, ["download", "--params", str(_params(tmp_path, name="flickr8k"))])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmp download: error: flickr8k data missing")


# ---------------------------------------------------------------- data.root and names
def test_relative_root_resolution(tmp_path, monkeypatch):
    """Relative roots: synthetic -> the working directory; a real set -> the real project
    root, also from inside a DVC experiment's temporary copy."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    real = tiny_config(data__name="tinyset", data__root="data/raw")
    synth = tiny_config(data__root="data/raw")
    assert dl.dataset_dir(real, cwd=copy) == (tmp_path / "proj").resolve() / "data/raw/tinyset"
    assert dl.default_cache_dir(real, cwd=copy) == (tmp_path / "proj").resolve() / "data/cache"
    assert dl.dataset_dir(synth, cwd=copy) == copy.resolve() / "data/raw/synthetic"
    absolute = tiny_config(data__name="tinyset", data__root=str(tmp_path / "elsewhere"))
    assert dl.dataset_dir(absolute, cwd=copy) == tmp_path / "elsewhere" / "tinyset"
    monkeypatch.setenv("DVC_ROOT", str(copy))  # what DVC sets in a queued run (mapped back too)
    assert dl.resolve_root(real) == (tmp_path / "proj").resolve() / "data/raw"


def test_own_dataset_name_must_be_in_place(tmp_path):
    cfg = tiny_config(data__name="my.set-1", data__root=str(tmp_path))
    with pytest.raises(DataError) as exc:
        run_download(cfg)  # no download source: one line naming both paths, no network
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(tmp_path / "my.set-1" / "dataset_my.set-1.json") in msg and str(tmp_path / "my.set-1" / "images") in msg
    _write_pngs(tmp_path / "my.set-1", "my.set-1", n=4)
    assert validate_dataset(run_download(cfg), "my.set-1")["splits"]["test"] == {"images": 1, "captions": 5}


def test_bad_dataset_name_is_refused():
    from dmp_core.config import ParamsError

    with pytest.raises(ParamsError, match="data.name"):
        tiny_config(data__name="../escape")


# ------------------------------------------------------------------------ manifest
def _png(colour, size=8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_pngs(ds, name, n=4, subdir=""):
    """A Karpathy-format set of ``n`` PNGs (5 captions each; the last image is test, the
    one before it val); ``subdir`` is written as each entry's COCO-style ``filepath``."""
    img_dir = ds / "images" / subdir
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n):
        (img_dir / f"im{k}.png").write_bytes(_png((10 * k, 100, 200)))
        entry = {"filename": f"im{k}.png", "split": "test" if k == n - 1 else "val" if k == n - 2 else "train",
                 "sentences": [{"raw": f"caption {j} of image {k}"} for j in range(5)]}
        if subdir:
            entry["filepath"] = subdir
        entries.append(entry)
    (ds / f"dataset_{name}.json").write_text(json.dumps({"images": entries}))
    return ds


@pytest.fixture
def no_racy_window(monkeypatch):
    """Cache files however recently they changed (the files of a test are seconds old)."""
    from dmp_core.data import manifest as mf

    monkeypatch.setattr(mf, "_RACY_NS", 0)


def test_manifest_is_deterministic_relative_and_cached(tmp_path, monkeypatch, no_racy_window):
    from dmp_core.data import manifest as mf

    ds = _write_pngs(tmp_path / "data" / "tinyset", "tinyset", subdir="train2014")
    before = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    first = mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")
    assert first["_stats"] == {"hashed": 5, "reused": 0}  # 4 images + the split file
    text = mf.manifest_text(first)
    assert str(tmp_path) not in text and "mtime" not in text
    doc = json.loads(text)
    assert [f["path"] for f in doc["files"]] == [f"images/train2014/im{k}.png" for k in range(4)]
    assert doc["files"][0] == {"path": "images/train2014/im0.png", "bytes": len(_png((0, 100, 200))),
                               "md5": hashlib.md5(_png((0, 100, 200))).hexdigest()}
    assert doc["split_file"]["path"] == "dataset_tinyset.json" and doc["splits"]["train"] == {"images": 2, "captions": 10}
    assert sorted(p.relative_to(ds) for p in ds.rglob("*")) == before  # nothing written into the dataset

    calls = []
    real_md5 = mf.file_md5
    monkeypatch.setattr(mf, "file_md5", lambda p: calls.append(p.name) or real_md5(p))
    again = mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")
    assert mf.manifest_text(again) == text and calls == []  # unchanged stat: nothing re-read
    assert again["_stats"] == {"hashed": 0, "reused": 5}
    for cache_file in (tmp_path / "cache").iterdir():  # a damaged cache only costs time
        cache_file.write_text('{"format": 1, "files": [')
    calls.clear()
    assert mf.manifest_text(mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")) == text
    assert len(calls) == 5

    # the same files elsewhere (another copy, another cache): the same manifest
    import shutil

    shutil.copytree(ds, tmp_path / "copy" / "tinyset")
    assert mf.manifest_text(mf.build_manifest(tmp_path / "copy" / "tinyset", "tinyset")) == text


def test_manifest_sees_a_replaced_image_even_with_the_same_size_and_mtime(tmp_path, no_racy_window):
    import os

    from dmp_core.data import manifest as mf

    ds = _write_pngs(tmp_path / "tinyset", "tinyset")
    text = mf.manifest_text(mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache"))
    target = ds / "images" / "im1.png"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the mtime restored (rsync -t, cp -p)
    changed = mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")
    assert changed["_stats"]["hashed"] == 1
    new = mf.manifest_text(changed)
    assert new != text
    diff = [ln for ln in new.splitlines() if ln not in text.splitlines()]
    assert len(diff) == 1 and "images/im1.png" in diff[0]
    # a caption edit changes the split file's checksum
    doc = json.loads((ds / "dataset_tinyset.json").read_text())
    doc["images"][0]["sentences"][0]["raw"] = "an edited caption"
    (ds / "dataset_tinyset.json").write_text(json.dumps(doc))
    assert mf.manifest_text(mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")) != new


def test_files_changed_just_before_hashing_are_not_cached(tmp_path):
    """A file could change again within the same timestamp tick: recent ones are re-read."""
    from dmp_core.data import manifest as mf

    ds = _write_pngs(tmp_path / "tinyset", "tinyset")
    mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")
    assert mf.build_manifest(ds, "tinyset", cache_dir=tmp_path / "cache")["_stats"] == {"hashed": 5, "reused": 0}


def test_manifest_missing_files_follow_on_bad_item(tmp_path):
    from dmp_core.data import manifest as mf

    ds = _write_pngs(tmp_path / "tinyset", "tinyset")
    (ds / "images" / "im2.png").unlink()
    with pytest.raises(DataError) as exc:
        mf.build_manifest(ds, "tinyset")
    msg = str(exc.value)
    assert "\n" not in msg and str(ds / "images" / "im2.png") in msg and "images[2]" in msg
    man = mf.build_manifest(ds, "tinyset", on_bad_item="skip")
    assert man["missing"] == [{"path": "images/im2.png", "item": "images[2]"}]
    assert man["counts"]["missing"] == 1 and man["counts"]["files"] == 3


def test_download_stage_writes_the_manifest(tmp_path):
    """The whole stage on a user-named set outside any project: manifest written, cache in
    the given folder, the set untouched; a second run gives the same bytes."""
    ds = _write_pngs(tmp_path / "shared" / "tinyset", "tinyset")
    cfg = tiny_config(data__name="tinyset", data__root=str(tmp_path / "shared"))
    root, report, man = dl.download_with_manifest(cfg, tmp_path / "proj" / "data" / "manifest.json",
                                                  cache_dir=tmp_path / "proj" / "data" / "cache")
    assert root == ds and report["missing_files"] == 0 and man["counts"]["files"] == 4
    first = (tmp_path / "proj" / "data" / "manifest.json").read_bytes()
    assert list((tmp_path / "proj" / "data" / "cache").glob("hashes-tinyset-*.json"))
    dl.download_with_manifest(cfg, tmp_path / "proj" / "data" / "manifest.json",
                              cache_dir=tmp_path / "proj" / "data" / "cache")
    assert (tmp_path / "proj" / "data" / "manifest.json").read_bytes() == first
