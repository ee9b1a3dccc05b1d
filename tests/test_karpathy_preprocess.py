"""Preprocess on a small Karpathy-format set of real image files (JPEG of several sizes
and aspect ratios, PNG with alpha, grayscale, CMYK JPEG, an EXIF-rotated JPEG), the
bad-item policy in both modes, atomic writes, the training fraction and tokenisation."""
from __future__ import annotations

import contextlib
import io as _io
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_config
from dmp_core import io as dio
from dmp_core.data import preprocess as pp
from dmp_core.data.download import run_download
from dmp_core.data.karpathy import read_karpathy
from dmp_core.data.preprocess import fraction_subset, load_image, run_preprocess
from dmp_core.data.text import decode, load_tokenizer
from dmp_core.errors import DataError

SIZE = 16
RED, BLUE, CYAN = (230, 20, 20), (20, 20, 230), (0, 255, 255)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _halves(w, h, first, second, vertical=False):
    """An image split in two colours: top/bottom halves, or left/right with vertical=True."""
    arr = np.zeros((h, w, 3), np.uint8)
    if vertical:
        arr[:, : w // 2], arr[:, w // 2 :] = first, second
    else:
        arr[: h // 2], arr[h // 2 :] = first, second
    return Image.fromarray(arr)


def make_files() -> dict[str, bytes]:
    files = {
        "wide.jpg": _jpeg(_halves(120, 60, RED, BLUE, vertical=True)),
        "tall.jpg": _jpeg(_halves(50, 90, RED, BLUE)),
        "square.jpg": _jpeg(Image.new("RGB", (33, 33), (10, 200, 10))),
        "gray.jpg": _jpeg(Image.new("L", (48, 64), 128)),
        "cmyk.jpg": _jpeg(Image.new("CMYK", (40, 40), (255, 0, 0, 0))),
    }
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, 20:] = (200, 0, 0, 255)  # left half fully transparent, right half opaque red
    buf = _io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    files["alpha.png"] = buf.getvalue()
    # stored landscape, top red / bottom blue; EXIF orientation 6 = rotate 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = _jpeg(_halves(80, 40, RED, BLUE), exif=exif.tobytes())
    for k in range(3):
        files[f"extra{k}.jpg"] = _jpeg(Image.new("RGB", (30 + 7 * k, 45), (40 * k, 90, 200 - 40 * k)))
    return files


SPLIT_OF = {"wide.jpg": "train", "tall.jpg": "train", "square.jpg": "restval", "gray.jpg": "train",
            "cmyk.jpg": "train", "alpha.png": "train", "rotated.jpg": "val", "extra0.jpg": "val",
            "extra1.jpg": "test", "extra2.jpg": "test"}


def make_set(root, name="flickr8k", mutate=None):
    """Write <root>/<name>/dataset_<name>.json + images/; ``mutate(doc, images_dir)`` injects faults."""
    ds = root / name
    images = ds / "images"
    images.mkdir(parents=True)
    for fname, data in make_files().items():
        (images / fname).write_bytes(data)
    doc = {"dataset": name, "images": [
        {"filename": f, "imgid": i, "split": SPLIT_OF[f],
         "sentences": [{"raw": f"A photo of the {f.split('.')[0]} image."}, {"raw": f"Another view: {i}!"}]}
        for i, f in enumerate(SPLIT_OF)]}
    if mutate is not None:
        mutate(doc, images)
    (ds / f"dataset_{name}.json").write_text(json.dumps(doc))
    return ds


def cfg_for(root, **kw):
    return tiny_config(data__name="flickr8k", data__root=str(root), data__image_size=SIZE, **kw)


def run(root, raw, **kw):
    """Preprocess with 3 decoding threads (the equality with 1 thread is tested below)."""
    return run_preprocess(cfg_for(root, **kw), raw_dir=raw, out_dir=root / "prepared", reports_dir=root / "reports",
                          workers=3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy")
    raw = make_set(root)
    summary = run(root, raw)
    return root, raw, summary


# ----------------------------------------------------------------------- images
def test_layout_counts_and_restval(prepared):
    root, _, summary = prepared
    assert {s: c["images"] for s, c in summary["counts"].items()} == {"train": 6, "val": 2, "test": 2}
    assert summary["skipped_total"] == 0
    meta = json.loads((root / "prepared" / "meta.json").read_text())
    assert meta["image_size"] == SIZE and meta["vocab_size"] == 30522 and meta["mask_token_id"] == 103
    assert meta["counts"]["train"] == {"images": 6, "captions": 12}
    for split in ("train", "val", "test"):
        arr = np.load(root / "prepared" / split / "images.npy", mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and arr.shape[1:] == (SIZE, SIZE, 3)
    info = json.loads((root / "prepared" / "train" / "images.json").read_text())
    assert "square.jpg" in [i["filename"] for i in info]  # restval went to train


def _prepared_image(root, split, filename):
    info = json.loads((root / "prepared" / split / "images.json").read_text())
    idx = [i["filename"] for i in info].index(filename)
    return np.load(root / "prepared" / split / "images.npy")[idx].astype(int)


def test_exif_orientation_is_honoured(prepared):
    img = _prepared_image(prepared[0], "val", "rotated.jpg")
    # displayed image: the stored top (red) is now on the right, the stored bottom (blue) on the left
    left, right = img[:, : SIZE // 2 - 2].mean((0, 1)), img[:, SIZE // 2 + 2 :].mean((0, 1))
    assert left[2] > 150 and left[0] < 80, left
    assert right[0] > 150 and right[2] < 80, right


def test_modes_become_rgb(prepared):
    root = prepared[0]
    gray = _prepared_image(root, "train", "gray.jpg")
    assert np.abs(gray - 128).max() <= 3
    cmyk = _prepared_image(root, "train", "cmyk.jpg")
    assert np.abs(cmyk - np.array(CYAN)).max() <= 12, cmyk[SIZE // 2, SIZE // 2]
    alpha = _prepared_image(root, "train", "alpha.png")
    assert np.abs(alpha[:, : SIZE // 2 - 1] - 255).max() <= 2  # transparent -> white
    assert np.abs(alpha[:, SIZE // 2 + 1 :] - np.array([200, 0, 0])).max() <= 2


def test_threads_give_identical_arrays(prepared, tmp_path):
    root, raw, _ = prepared
    run_preprocess(cfg_for(root), raw_dir=raw, out_dir=tmp_path / "one", reports_dir=tmp_path / "r", workers=1)
    for split in ("train", "val", "test"):
        for name in ("images.npy", "tokens.npy", "attention_mask.npy", "images.json"):
            assert (tmp_path / "one" / split / name).read_bytes() == (root / "prepared" / split / name).read_bytes()


def test_own_name_at_a_relative_root_gives_the_same_arrays(prepared, tmp_path, monkeypatch):
    """A set under a made-up name at a relative data.root (resolved against the project
    root, here the working directory of a folder outside git): the download stage
    validates it where it is, and the same files give the same arrays as under flickr8k."""
    root, _, _ = prepared
    proj = tmp_path / "proj"
    make_set(proj / "datasets", name="my_photos.v2")
    monkeypatch.chdir(proj)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    cfg = tiny_config(data__name="my_photos.v2", data__root="datasets", data__image_size=SIZE)
    raw = run_download(cfg)
    assert raw == proj.resolve() / "datasets" / "my_photos.v2"
    run_preprocess(cfg, raw_dir=raw, out_dir=tmp_path / "prep", reports_dir=tmp_path / "rep", workers=3)
    for split in ("train", "val", "test"):
        for name in ("images.npy", "tokens.npy", "attention_mask.npy", "captions.parquet", "images.json"):
            assert (tmp_path / "prep" / split / name).read_bytes() == (root / "prepared" / split / name).read_bytes()
    assert json.loads((tmp_path / "prep" / "meta.json").read_text())["dataset"] == "my_photos.v2"


def test_shorter_side_crop_and_squash(tmp_path):
    path = tmp_path / "wide.png"
    # 120 x 60: left third blue, middle third red, right third blue
    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, :40], arr[:, 40:80], arr[:, 80:] = BLUE, RED, BLUE
    Image.fromarray(arr).save(path)
    crop = load_image(path, 12, "shorter_crop").astype(int)
    squash = load_image(path, 12, "squash").astype(int)
    # centre crop keeps the 60 px middle: columns of the 12 px result map to x = 30 + 5 * col
    for col in range(12):
        x = 30 + 5 * col + 2
        want = RED if 40 <= x < 80 else BLUE
        if abs(x - 40) > 4 and abs(x - 80) > 4:  # away from the colour edges (resampling blurs them)
            assert np.abs(crop[6, col] - np.array(want)).max() < 30, col
    # squash keeps everything: blue on both outer thirds
    assert squash[6, 0, 2] > 200 and squash[6, 11, 2] > 200 and squash[6, 6, 0] > 200


# --------------------------------------------------------------------- captions
def test_captions_and_tokens_align(prepared):
    root = prepared[0]
    tok = load_tokenizer("minilm")
    for split in ("train", "val", "test"):
        d = root / "prepared" / split
        table = pd.read_parquet(d / "captions.parquet")
        assert list(table.columns) == ["caption_id", "image_index", "raw", "clean"]
        tokens, mask = np.load(d / "tokens.npy"), np.load(d / "attention_mask.npy")
        assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and tokens.shape == (len(table), 16)
        for m, row in table.iterrows():
            assert row["caption_id"] == m
            assert row["clean"] == row["raw"].lower().replace(".", "").replace(":", "").replace("!", "").strip()
            assert decode(tok, tokens[m]) == row["clean"]
            n = int(mask[m].sum())
            assert list(mask[m]) == [1] * n + [0] * (16 - n)
            assert tokens[m, n - 1] == tok.sep_token_id and (tokens[m, n:] == tok.pad_token_id).all()
        info = json.loads((d / "images.json").read_text())
        # caption -> image: the raw caption names its image file
        for _, row in table.iterrows():
            stem = info[row["image_index"]]["filename"].split(".")[0]
            assert stem in row["raw"] or "Another view" in row["raw"]


# ---------------------------------------------------------------------- bad items
def _zero_byte(doc, images):
    (images / "tall.jpg").write_bytes(b"")
    return "zero_byte_file", "tall.jpg"


def _truncated(doc, images):
    data = (images / "wide.jpg").read_bytes()
    (images / "wide.jpg").write_bytes(data[: len(data) // 2])
    return "undecodable_image", "wide.jpg"


def _not_an_image(doc, images):
    (images / "gray.jpg").write_text("this is not a jpeg")
    return "undecodable_image", "gray.jpg"


def _missing(doc, images):
    (images / "cmyk.jpg").unlink()
    return "missing_file", "cmyk.jpg"


def _duplicate(doc, images):
    doc["images"].append(dict(doc["images"][0], imgid=99))
    return "duplicate_filename", "images[10]"


def _empty_caption(doc, images):
    doc["images"][1]["sentences"][0]["raw"] = " ?! "
    return "empty_caption", "images[1].sentences[0]"


def _all_captions_empty(doc, images):
    doc["images"][2]["sentences"] = [{"raw": "..."}, {"raw": ""}]
    return "all_captions_empty", "images[2]"


FAULTS = [_zero_byte, _truncated, _not_an_image, _missing, _duplicate, _empty_caption, _all_captions_empty]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_item_error_mode(tmp_path, fault):
    found = {}
    raw = make_set(tmp_path, mutate=lambda doc, images: found.update(zip(("reason", "name"), fault(doc, images))))
    with pytest.raises(DataError) as exc:
        run(tmp_path, raw)
    msg = str(exc.value)
    assert "\n" not in msg and found["name"] in msg and "on_bad_item" in msg
    assert pp.BAD_REASONS[found["reason"]] in msg
    assert not (tmp_path / "prepared" / "train" / "images.npy").exists()


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_item_skip_mode(tmp_path, fault):
    found = {}
    raw = make_set(tmp_path, mutate=lambda doc, images: found.update(zip(("reason", "name"), fault(doc, images))))
    summary = run(tmp_path, raw, data__on_bad_item="skip")
    assert summary["skipped"][found["reason"]] == 1 and summary["skipped_total"] == 1
    assert found["name"] in summary["skipped_items"][0]["item"]
    on_disk = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert on_disk["skipped_items"] == summary["skipped_items"]
    train = summary["counts"]["train"]
    if found["reason"] == "empty_caption":
        assert (train["images"], train["captions"]) == (6, 11)
    elif found["reason"] == "duplicate_filename":  # the first listing is kept, the repeat dropped
        assert (train["images"], train["captions"]) == (6, 12)
    else:  # the whole image is left out; nothing else is
        assert (train["images"], train["captions"]) == (5, 10)
    assert np.load(tmp_path / "prepared" / "train" / "images.npy").shape[0] == train["images"]


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_malformed_json_is_always_an_error(tmp_path, mode):
    raw = make_set(tmp_path)
    (raw / "dataset_flickr8k.json").write_text('{"images": [{"filename": "a.jpg",')
    with pytest.raises(DataError, match=r"dataset_flickr8k\.json: malformed JSON at line 1"):
        run(tmp_path, raw, data__on_bad_item=mode)
    (raw / "dataset_flickr8k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(DataError, match=r"images\[0\]\.sentences: expected a list"):
        run(tmp_path, raw, data__on_bad_item=mode)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_empty_split_is_always_an_error(tmp_path, mode):
    def drop_test(doc, images):
        doc["images"] = [e for e in doc["images"] if e["split"] != "test"]

    raw = make_set(tmp_path, mutate=drop_test)
    with pytest.raises(DataError, match="split 'test' has no images"):
        run(tmp_path, raw, data__on_bad_item=mode)


def test_split_emptied_by_skips_is_an_error(tmp_path):
    def break_test(doc, images):
        for f in ("extra1.jpg", "extra2.jpg"):
            (images / f).write_bytes(b"")

    raw = make_set(tmp_path, mutate=break_test)
    with pytest.raises(DataError, match="split 'test' has no images left"):
        run(tmp_path, raw, data__on_bad_item="skip")
    listed = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert listed["skipped"]["zero_byte_file"] == 2


# ------------------------------------------------------------------ atomic writes
def test_crash_mid_write_leaves_previous_output(tmp_path, monkeypatch):
    raw = make_set(tmp_path)
    run(tmp_path, raw)
    out = tmp_path / "prepared" / "train"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real = dio.open_memmap_atomic

    @contextlib.contextmanager
    def crashing(dest, dtype, shape):
        with real(dest, dtype, shape) as arr:
            class Killed:
                writes = 0

                def __setitem__(self, key, value):
                    arr[key] = value
                    Killed.writes += 1
                    if Killed.writes == 2:
                        raise KeyboardInterrupt("killed mid-write")
            yield Killed()

    monkeypatch.setattr(pp, "_COPY_ROWS", 2)
    monkeypatch.setattr(pp, "open_memmap_atomic", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, raw)  # same params: a rerun killed while writing images.npy
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    def half_save(fh, array, allow_pickle=False):
        fh.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, raw, data__max_tokens=8)  # dies writing the new tokens.npy
    assert (out / "tokens.npy").read_bytes() == before["tokens.npy"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".scratch")]


# ----------------------------------------------------------------------- fraction
@pytest.mark.parametrize("n", [1, 7, 48, 1000])
def test_fraction_subset_is_nested(n):
    fracs = [0.1, 0.25, 0.5, 1.0]
    subsets = [set(fraction_subset(n, f, seed=3).tolist()) for f in fracs]
    for f, s in zip(fracs, subsets):
        assert len(s) == max(1, math.ceil(f * n))
    for small, big in zip(subsets, subsets[1:]):
        assert small <= big
    assert subsets[-1] == set(range(n))


def test_fraction_selects_nested_training_images(tmp_path):
    raw = run_download(tiny_config(data__root=str(tmp_path / "raw")))
    seen = {}
    for f in (0.1, 0.25, 0.5, 1.0):
        out = tmp_path / f"prep{f}"
        # batch 2: the params' cross-field check wants a batch no larger than the 5 pairs at f=0.1
        cfg = tiny_config(data__root=str(tmp_path / "raw"), data__fraction=f, pretrain__batch_size=2,
                          finetune__batch_size=2)
        run_preprocess(cfg, raw_dir=raw,
                       out_dir=out, reports_dir=tmp_path / f"rep{f}")
        names = [i["filename"] for i in json.loads((out / "train" / "images.json").read_text())]
        table = pd.read_parquet(out / "train" / "captions.parquet")
        assert len(names) == math.ceil(f * 48) and len(table) == 2 * len(names)  # all captions of each image
        seen[f] = (set(names), {s: (out / s / "images.npy").read_bytes() + (out / s / "tokens.npy").read_bytes()
                                for s in ("val", "test")})
    for small, big in ((0.1, 0.25), (0.25, 0.5), (0.5, 1.0)):
        assert seen[small][0] < seen[big][0]
        assert seen[small][1] == seen[big][1]  # val/test never change


def test_synthetic_metadata_reaches_images_json(tmp_path):
    raw = run_download(tiny_config(data__root=str(tmp_path / "raw")))
    run_preprocess(tiny_config(), raw_dir=raw, out_dir=tmp_path / "p", reports_dir=tmp_path / "r")
    info = json.loads((tmp_path / "p" / "test" / "images.json").read_text())
    items = {it.filename: it for it in read_karpathy(raw / "dataset_synthetic.json")}
    assert [i["objects"] for i in info] == [items[i["filename"]].extra["objects"] for i in info]
    assert any(i["group"] is not None for i in info)


# ----------------------------------------------------------------- binding groups
def _with_groups(groups):
    """A mutate hook setting ``group`` on the entries named in ``groups`` (filename -> value)."""
    def mutate(doc, images):
        for entry in doc["images"]:
            if entry["filename"] in groups:
                entry["group"] = groups[entry["filename"]]
    return mutate


def test_groups_reach_images_json_and_become_clusters(tmp_path):
    from dmp_core.training.dataset import PairDataset, read_image_clusters

    raw = make_set(tmp_path, mutate=_with_groups({"extra1.jpg": 7, "extra2.jpg": 7, "rotated.jpg": None}))
    run(tmp_path, raw)
    out = tmp_path / "prepared"
    test_info = json.loads((out / "test" / "images.json").read_text())
    assert [i["group"] for i in test_info] == [7, 7]
    val_info = json.loads((out / "val" / "images.json").read_text())
    assert [i.get("group", "absent") for i in val_info] == [None, "absent"]
    assert read_image_clusters(out / "test", 2).tolist() == [0, 0]  # one binding group: one unit
    assert read_image_clusters(out / "val", 2).tolist() == [0, 1]  # null and absent: one unit per image
    assert PairDataset(out, "train").image_clusters().tolist() == list(range(6))  # a real set: images


def test_read_image_clusters_joins_equal_groups_and_names_bad_values(tmp_path):
    from dmp_core.training.dataset import read_image_clusters

    split = tmp_path / "test"
    split.mkdir()
    assert read_image_clusters(split, 3).tolist() == [0, 1, 2]  # older outputs without images.json
    info = [{"group": 5}, {"group": None}, {"group": 2}, {"group": 5}, {}, {"group": 2}]
    (split / "images.json").write_text(json.dumps(info))
    clusters = read_image_clusters(split, 6)
    assert clusters.dtype == np.int64 and clusters.tolist() == [0, 1, 2, 0, 3, 2]
    for bad in ("a", 1.5, True, [1]):
        (split / "images.json").write_text(json.dumps([{"group": 1}, {"group": bad}]))
        with pytest.raises(DataError) as exc:
            read_image_clusters(split, 2)
        msg = str(exc.value)
        assert "\n" not in msg and "images.json" in msg and "[1].group" in msg, msg
    (split / "images.json").write_text(json.dumps([{"group": 1}]))
    with pytest.raises(DataError, match="expected a list of 2 images"):
        read_image_clusters(split, 2)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_group_in_the_raw_json_is_always_an_error(tmp_path, mode):
    raw = make_set(tmp_path, mutate=_with_groups({"extra2.jpg": "g1"}))
    with pytest.raises(DataError) as exc:
        run(tmp_path, raw, data__on_bad_item=mode)
    msg = str(exc.value)
    assert "\n" not in msg and "dataset_flickr8k.json" in msg and "images[9].group" in msg and "'g1'" in msg
    assert not (tmp_path / "prepared" / "test" / "images.npy").exists()
