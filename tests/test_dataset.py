"""PairDataset over a prepared tiny synthetic set (targets are written here as fakes)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_config
from dmp_core.training.dataset import PairDataset
from dmp_core.data.download import run_download
from dmp_core.data.preprocess import run_preprocess
from dmp_core.errors import DataError
from dmp_core.io import save_npy


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    cfg = tiny_config(data__root=str(root / "raw"), data__synthetic__captions_per_image=3)
    raw = run_download(cfg)
    run_preprocess(cfg, raw_dir=raw, out_dir=root / "prepared", reports_dir=root / "reports")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):  # fake targets in the contract's layout: float16 [N, P, D]
        n = np.load(root / "prepared" / split / "images.npy", mmap_mode="r").shape[0]
        save_npy(root / "targets" / split / "hog.npy", rng.normal(size=(n, 16, 36)).astype(np.float16))
        save_npy(root / "targets" / split / "pixel.npy", rng.normal(size=(n, 16, 192)).astype(np.float16))
    return root


def test_all_captions_items(prepared):
    ds = PairDataset(prepared / "prepared", "train", targets_dir=prepared / "targets", target_kinds=("hog", "pixel"))
    images = np.load(prepared / "prepared" / "train" / "images.npy")
    tokens = np.load(prepared / "prepared" / "train" / "tokens.npy")
    mask = np.load(prepared / "prepared" / "train" / "attention_mask.npy")
    hog = np.load(prepared / "targets" / "train" / "hog.npy")
    table = pd.read_parquet(prepared / "prepared" / "train" / "captions.parquet")
    assert len(ds) == ds.num_captions == len(table) == 48 * 3 and ds.num_images == 48
    for m in (0, 1, 77, len(ds) - 1):
        item = ds[m]
        i = int(table["image_index"][m])
        assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, 32, 32)
        for c in range(3):
            assert torch.equal(item["image"][c], torch.from_numpy(images[i][:, :, c]))
        assert item["image_id"].item() == i and item["caption_id"].item() == m
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].tolist() == tokens[m].tolist()
        assert item["attention_mask"].dtype == torch.int64 and item["attention_mask"].tolist() == mask[m].tolist()
        assert item["hog"].dtype == torch.float32 and torch.equal(item["hog"], torch.from_numpy(hog[i].astype(np.float32)))
        assert tuple(item["pixel"].shape) == (16, 192)


def test_accessors(prepared):
    ds = PairDataset(prepared / "prepared", "test")
    table = pd.read_parquet(prepared / "prepared" / "test" / "captions.parquet")
    assert ds.txt2img.tolist() == table["image_index"].tolist()
    for i, caps in enumerate(ds.img2txt):  # brute force inverse of txt2img
        assert sorted(caps.tolist()) == [m for m in range(len(table)) if table["image_index"][m] == i]
    all_images = torch.cat(list(ds.iter_images(batch_size=5)))
    assert all_images.shape == (16, 3, 32, 32) and torch.equal(all_images[7], ds[ds.img2txt[7][0]]["image"])
    ids, masks = zip(*ds.iter_texts(batch_size=7))
    ids, masks = torch.cat(ids), torch.cat(masks)
    assert ids.shape == (48, 16) and ids.dtype == torch.int64 and masks.dtype == torch.int64
    assert torch.equal(ids[5], ds[5]["input_ids"])
    assert ds.meta["vocab_size"] == 30522 and len(ds.image_info()) == 16


def test_one_per_image_is_deterministic_per_epoch(prepared):
    ds = PairDataset(prepared / "prepared", "train", captions="one_per_image", seed=1)
    assert len(ds) == 48

    def picks():
        return [ds[i]["caption_id"].item() for i in range(len(ds))]

    e0 = picks()
    assert e0 == picks()
    for i, m in enumerate(e0):
        assert m in ds.img2txt[i].tolist() and ds[i]["image_id"].item() == i
    ds.set_epoch(1)
    e1 = picks()
    assert e1 != e0
    ds.set_epoch(0)
    assert picks() == e0
    other = PairDataset(prepared / "prepared", "train", captions="one_per_image", seed=2)
    assert [other[i]["caption_id"].item() for i in range(48)] != e0
    assert len(set(e0 + e1)) > 48  # over epochs, more than one caption per image is seen


def test_pickles_without_arrays_and_loads_in_workers(prepared):
    ds = PairDataset(prepared / "prepared", "val", targets_dir=prepared / "targets", target_kinds=())
    ds[0]  # opens the memmaps
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert torch.equal(clone[3]["image"], ds[3]["image"])
    batches = list(DataLoader(ds, batch_size=8, num_workers=2, shuffle=False))
    assert torch.equal(torch.cat([b["caption_id"] for b in batches]), torch.arange(len(ds)))
    assert batches[0]["image"].shape == (8, 3, 32, 32)


def test_missing_files_are_clear_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="run `dmp preprocess` first"):
        PairDataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"val/hog\.npy: not found"):
        PairDataset(prepared / "prepared", "val", targets_dir=prepared / "targets", target_kinds=("hog",))


@pytest.mark.parametrize("captions", ["all", "one_per_image"])
def test_image_subset_holds_exactly_the_items_of_its_images(prepared, captions):
    """pretrain.data_fraction's view: every item of a kept image, none of another, read unchanged."""
    from dmp_core.training.dataset import ImageSubset
    from dmp_core.training.loop import pretrain_images

    ds = PairDataset(prepared / "prepared", "train", targets_dir=prepared / "targets", target_kinds=("hog",),
                     captions=captions, seed=3)
    keep = pretrain_images(ds.num_images, 0.25, seed=3)
    sub = ImageSubset(ds, keep)
    assert sub.num_images == len(keep) == 12  # ceil(0.25 * 48)
    brute = [i for i in range(len(ds)) if ds.image_of_item(i) in set(keep.tolist())]
    assert sub.items.tolist() == brute and len(sub) == len(keep) * (3 if captions == "all" else 1)
    sub.set_epoch(2)
    for j in (0, len(sub) - 1):
        got, want = sub[j], ds[brute[j]]
        assert sub.image_of_item(j) == int(got["image_id"]) and int(got["image_id"]) in keep
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_pretrain_images_are_nested_across_fractions_and_differ_by_seed():
    from dmp_core.training.loop import pretrain_images

    small, mid, full = (set(pretrain_images(753, f, seed=1).tolist()) for f in (0.25, 0.5, 1.0))
    assert len(small) == 189 and len(mid) == 377 and full == set(range(753))
    assert small < mid < full
    assert set(pretrain_images(753, 0.25, seed=2).tolist()) != small
