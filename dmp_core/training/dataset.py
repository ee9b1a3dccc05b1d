"""``PairDataset``: image-caption pairs from ``data/prepared/<split>/`` for training and evaluation.

Arrays are memory-mapped and opened lazily, on first access in each process, so the
dataset pickles cheaply to DataLoader workers. Items follow docs/ARCHITECTURE.md
"Batches": ``image`` uint8 [3, H, W], ``image_id``, ``caption_id``, ``input_ids`` and
``attention_mask`` int64 [L], plus ``hog`` / ``pixel`` float32 [P, D] when requested
from ``data/targets/<split>/<kind>.npy`` (float16 [N, P, D]).

``captions="all"``: one item per caption. ``captions="one_per_image"``: one item per
image, with a caption drawn deterministically from (seed, epoch, image); call
:meth:`set_epoch` at the start of each epoch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dmp_core.errors import DataError


def read_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """``<prepared_dir>/meta.json`` (written by preprocess); one-line DataError if absent or invalid."""
    path = Path(prepared_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the preprocess stage)") from None
    except json.JSONDecodeError:
        raise DataError(f"{path}: invalid JSON") from None


def read_image_clusters(split_dir: str | Path, n_images: int) -> np.ndarray:
    """int64 [N]: the independent unit (cluster) of every image of a prepared split.

    From the ``group`` field of ``<split_dir>/images.json`` (the raw Karpathy entry's
    ``group``, carried by preprocess): images with the same integer group are one cluster
    (a synthetic binding group: each other's distractors); an image whose group is null
    is its own cluster. Ids are 0..C-1 in order of first appearance, so a split without
    groups (a real dataset, or images.json absent in older outputs) gives ``arange(N)``:
    one cluster per image. A group that is neither an integer nor null, or an
    images.json that does not list the N images, is a one-line DataError.
    """
    path = Path(split_dir) / "images.json"
    if not path.is_file():
        return np.arange(n_images, dtype=np.int64)
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: invalid JSON") from None
    if not isinstance(info, list) or len(info) != n_images:
        size = len(info) if isinstance(info, list) else type(info).__name__
        raise DataError(f"{path}: expected a list of {n_images} images (one per row of images.npy), got {size}")
    out = np.empty(n_images, dtype=np.int64)
    cluster_of_group: dict[int, int] = {}
    n_clusters = 0
    for i, entry in enumerate(info):
        group = entry.get("group") if isinstance(entry, dict) else None
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
            raise DataError(f"{path}: [{i}].group: expected an integer group id or null (got {group!r:.80})")
        if group is not None and group in cluster_of_group:
            out[i] = cluster_of_group[group]
            continue
        out[i] = n_clusters
        if group is not None:
            cluster_of_group[group] = n_clusters
        n_clusters += 1
    return out


TARGET_KINDS = ("hog", "pixel")


def _shape(path: Path) -> tuple[int, ...]:
    """The shape of a .npy file without reading its data."""
    return np.load(path, mmap_mode="r").shape


class PairDataset(Dataset):
    def __init__(
        self,
        prepared_dir: str | Path,
        split: str,
        targets_dir: Optional[str | Path] = None,
        target_kinds: Sequence[str] = (),
        captions: Literal["all", "one_per_image"] = "all",
        seed: int = 0,
    ) -> None:
        self.prepared_dir = Path(prepared_dir)
        self.split = split
        self.split_dir = self.prepared_dir / split
        self.captions = captions
        self.seed = int(seed)
        self.epoch = 0
        if captions not in ("all", "one_per_image"):
            raise ValueError(f"captions must be 'all' or 'one_per_image' (got {captions!r})")
        for fname in ("images.npy", "tokens.npy", "attention_mask.npy", "captions.parquet"):
            if not (self.split_dir / fname).is_file():
                raise DataError(f"{self.split_dir / fname}: not found (run `dmp preprocess` first)")

        import pandas as pd

        table = pd.read_parquet(self.split_dir / "captions.parquet", columns=["caption_id", "image_index"])
        if not np.array_equal(table["caption_id"].to_numpy(), np.arange(len(table))):
            raise DataError(f"{self.split_dir / 'captions.parquet'}: caption_id must be 0..M-1 in order")
        self._txt2img = table["image_index"].to_numpy(dtype=np.int64)
        self._num_images = int(_shape(self.split_dir / "images.npy")[0])
        if len(self._txt2img) and (self._txt2img.min() < 0 or self._txt2img.max() >= self._num_images):
            raise DataError(f"{self.split_dir / 'captions.parquet'}: image_index outside 0..{self._num_images - 1}")
        # image -> captions as CSR arrays (pickles as two arrays, not N small ones)
        self._order = np.argsort(self._txt2img, kind="stable")
        self._bounds = np.searchsorted(self._txt2img[self._order], np.arange(self._num_images + 1))
        if (np.diff(self._bounds) == 0).any():
            raise DataError(f"{self.split_dir}: an image has no caption")
        n_tokens = _shape(self.split_dir / "tokens.npy")[0]
        if n_tokens != len(self._txt2img):
            raise DataError(f"{self.split_dir / 'tokens.npy'}: {n_tokens} rows for {len(self._txt2img)} captions")

        self.target_kinds = tuple(target_kinds)
        self.targets_dir = Path(targets_dir) if targets_dir is not None else None
        for kind in self.target_kinds:
            if kind not in TARGET_KINDS:
                raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
            if self.targets_dir is None:
                raise ValueError("target_kinds given without targets_dir")
            path = self.targets_dir / split / f"{kind}.npy"
            if not path.is_file():
                raise DataError(f"{path}: not found (run `dmp targets` first)")
            if _shape(path)[0] != self._num_images:
                raise DataError(f"{path}: {_shape(path)[0]} rows for {self._num_images} images")
        self._arrays: Optional[dict[str, np.ndarray]] = None

    # ------------------------------------------------------------------ internals

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = {
                "images": np.load(self.split_dir / "images.npy", mmap_mode="r"),
                "tokens": np.load(self.split_dir / "tokens.npy", mmap_mode="r"),
                "mask": np.load(self.split_dir / "attention_mask.npy", mmap_mode="r"),
            }
            for kind in self.target_kinds:
                assert self.targets_dir is not None
                arrays[kind] = np.load(self.targets_dir / self.split / f"{kind}.npy", mmap_mode="r")
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # reopened lazily in the worker
        return state

    # --------------------------------------------------------------- accessors
    @property
    def num_images(self) -> int:
        return self._num_images

    @property
    def num_captions(self) -> int:
        return len(self._txt2img)

    @property
    def txt2img(self) -> np.ndarray:
        """int64 [M]: the image index of each caption."""
        return self._txt2img

    @property
    def img2txt(self) -> list[np.ndarray]:
        """Per image, the caption ids that describe it."""
        return [self.captions_of(i) for i in range(self._num_images)]

    def captions_of(self, image_id: int) -> np.ndarray:
        """The caption ids of one image (ascending)."""
        return self._order[self._bounds[image_id] : self._bounds[image_id + 1]]

    @property
    def meta(self) -> dict[str, Any]:
        return read_meta(self.prepared_dir)

    def image_clusters(self) -> np.ndarray:
        """int64 [N]: the cluster (binding group, else the image itself) of every image.

        See :func:`read_image_clusters`."""
        return read_image_clusters(self.split_dir, self._num_images)

    def image_info(self) -> list[dict[str, Any]]:
        with open(self.split_dir / "images.json") as fh:
            return json.load(fh)

    def caption_table(self):
        """pandas DataFrame: caption_id, image_index, raw, clean."""
        import pandas as pd

        return pd.read_parquet(self.split_dir / "captions.parquet")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def caption_for_image(self, image_id: int, epoch: Optional[int] = None) -> int:
        """The caption that ``one_per_image`` uses for this image in this epoch."""
        choices = self.captions_of(image_id)
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, image_id])
        return int(choices[rng.integers(len(choices))])

    def images(self, index: slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 [B, 3, H, W] for image indices (a slice or a list)."""
        arr = np.asarray(self._open()["images"][index])
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def tokens(self, index: slice | Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids int64 [B, L], attention_mask int64 [B, L]) for caption ids."""
        a = self._open()
        ids = torch.from_numpy(np.asarray(a["tokens"][index], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(a["mask"][index], dtype=np.int64))
        return ids, mask

    def iter_images(self, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """Every image in order, as uint8 [B, 3, H, W] chunks."""
        for start in range(0, self.num_images, batch_size):
            yield self.images(slice(start, start + batch_size))

    def iter_texts(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every caption in caption_id order, as (input_ids, attention_mask) chunks."""
        for start in range(0, self.num_captions, batch_size):
            yield self.tokens(slice(start, start + batch_size))

    def image_of_item(self, idx: int) -> int:
        """The image of training item ``idx`` (an image, or a caption with ``captions: all``)."""
        return int(idx) if self.captions == "one_per_image" else int(self._txt2img[idx])

    # ----------------------------------------------------------------- Dataset
    def __len__(self) -> int:
        return self.num_images if self.captions == "one_per_image" else self.num_captions

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        if self.captions == "one_per_image":
            image_id, caption_id = idx, self.caption_for_image(idx)
        else:
            image_id, caption_id = int(self._txt2img[idx]), idx
        a = self._open()
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(a["images"][image_id].transpose(2, 0, 1))),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "caption_id": torch.tensor(caption_id, dtype=torch.int64),
            "input_ids": torch.from_numpy(np.asarray(a["tokens"][caption_id], dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(a["mask"][caption_id], dtype=np.int64)),
        }
        for kind in self.target_kinds:
            item[kind] = torch.from_numpy(np.asarray(a[kind][image_id], dtype=np.float32))
        return item


class ImageSubset(Dataset):
    """The training items of ``dataset`` whose image is one of ``images``: what pretraining
    sees at ``pretrain.data_fraction`` < 1 (:func:`dmp_core.training.loop.pretrain_images`). Item ``i`` is the
    dataset's item ``items[i]``; image ids stay the dataset's, so the MIM targets and
    ``image_id`` keep pointing at the right rows."""

    def __init__(self, dataset: PairDataset, images: np.ndarray):
        self.dataset = dataset
        self.image_ids = np.asarray(images, dtype=np.int64)
        keep = np.zeros(dataset.num_images, dtype=bool)
        keep[self.image_ids] = True
        item_image = np.arange(dataset.num_images) if dataset.captions == "one_per_image" else dataset.txt2img
        self.items = np.flatnonzero(keep[item_image])

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def image_of_item(self, idx: int) -> int:
        return self.dataset.image_of_item(int(self.items[idx]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.dataset[int(self.items[idx])]
