"""Reader for the Karpathy split format shared by Flickr8k, Flickr30k, COCO and the
synthetic set.

Layout under ``<data.root>/<data.name>/``::

    dataset_<name>.json   {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}, ...]}
    images/[<filepath>/]<filename>

Karpathy's ``restval`` images go to train; ``val`` is kept for model selection.
A structurally malformed file (not JSON, no ``images`` list, an entry without a
filename, split or sentence list) is always a :class:`DataError` naming the entry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmp_core.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGES_DIR = "images"


@dataclass(frozen=True)
class KarpathyImage:
    """One ``images[]`` entry of a Karpathy split file."""

    index: int  # position in images[] (names the entry in error messages)
    filename: str
    filepath: str  # sub-folder under images/ ('' if none; COCO uses train2014/val2014)
    split: str  # train | val | test (restval already mapped to train)
    sentences: tuple[str, ...]
    source_id: Any  # cocoid / imgid / the entry's index
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. synthetic 'objects', 'group'

    @property
    def relpath(self) -> str:
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename

    @property
    def where(self) -> str:
        return f"images[{self.index}] ({self.relpath})"


def dataset_json(dataset_dir: str | Path, name: str) -> Path:
    return Path(dataset_dir) / f"dataset_{name}.json"


def image_path(dataset_dir: str | Path, item: KarpathyImage) -> Path:
    return Path(dataset_dir) / IMAGES_DIR / item.relpath


def _bad(path: Path, where: str, what: str) -> DataError:
    return DataError(f"{path}: {where}: {what}")


def read_karpathy(path: str | Path) -> list[KarpathyImage]:
    """Parse and structurally validate a Karpathy split file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: malformed JSON (not UTF-8 text)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: malformed Karpathy file: expected an object with an 'images' list")

    items: list[KarpathyImage] = []
    for i, entry in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise _bad(path, where, "expected an object")
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip() or "/" in filename or filename in (".", ".."):
            raise _bad(path, where + ".filename", f"expected a plain file name (got {filename!r})")
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str) or filepath.startswith("/") or ".." in filepath.split("/"):
            raise _bad(path, where + ".filepath", f"expected a relative folder (got {filepath!r})")
        split = entry.get("split")
        if split not in SPLIT_ALIASES:
            raise _bad(path, where + ".split", f"expected one of {sorted(SPLIT_ALIASES)} (got {split!r})")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise _bad(path, where + ".sentences", "expected a list")
        raws = []
        for k, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(raw, str):
                raise _bad(path, f"{where}.sentences[{k}].raw", "expected a string")
            raws.append(raw)
        source_id = entry.get("cocoid", entry.get("imgid", i))
        extra = {k: entry[k] for k in ("objects", "group", "variant") if k in entry}
        items.append(KarpathyImage(i, filename, filepath.strip("/"), SPLIT_ALIASES[split], tuple(raws), source_id, extra))
    return items
