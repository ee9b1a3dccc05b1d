"""The preprocess stage: Karpathy-format raw data -> memory-mappable arrays.

For every split (``train``, ``val``, ``test``) it writes under ``out_dir``::

    <split>/images.npy          uint8 [N, H, W, 3]
    <split>/captions.parquet    caption_id, image_index, raw, clean
    <split>/tokens.npy          int32 [M, L]   (row m = caption_id m)
    <split>/attention_mask.npy  uint8 [M, L]
    <split>/images.json         per image: filename, filepath, source_id, json_index (+ synthetic fields:
                                objects, variant, group)
    meta.json                   tokenizer, vocab size, special ids, max_tokens, image_size, counts

and ``reports_dir/summary.json`` (counts, skipped items by reason, listed).

Images are decoded with Pillow in a thread pool (Pillow releases the GIL while it
decodes and resamples), EXIF orientation is honoured, every mode is converted to
RGB (alpha composited on white) and resized to ``data.image_size``: shorter side
then centre crop (``shorter_crop``) or both sides (``squash``).

The raw entries' ``group`` field (synthetic binding groups: test images that are each
other's distractors, an int id or null) is carried to ``images.json``; evaluation makes
each group one resampling unit of the bootstrap
(:func:`dmp_core.training.dataset.read_image_clusters`). A ``group`` that is neither an
integer nor null is an error naming the file and the entry's field, in both modes.

Bad items follow ``data.on_bad_item``: ``error`` stops at the first with one line
naming it; ``skip`` leaves it out and lists it in the summary. A split without
images and a malformed JSON file are errors in both modes.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from dmp_core.config import nested_count
from dmp_core.data.karpathy import SPLITS, KarpathyImage, dataset_json, image_path, read_karpathy
from dmp_core.data.text import TokenizerInfo, cleaner_from_config, load_tokenizer, tokenize
from dmp_core.errors import DataError
from dmp_core.io import atomic_path, open_memmap_atomic, save_npy, write_json

# reason -> what it means (also the wording of error messages)
BAD_REASONS = {
    "duplicate_filename": "the same image file is listed twice",
    "missing_file": "image file not found",
    "zero_byte_file": "image file is empty (0 bytes)",
    "undecodable_image": "image cannot be decoded (truncated or not an image)",
    "empty_caption": "caption is empty after cleaning",
    "all_captions_empty": "every caption of the image is empty after cleaning",
}
FRACTION_SEED_KEY = 0xF4AC7  # mixes with cfg.seed: the subset does not depend on other params
_COPY_ROWS = 1024


class BadImage(Exception):
    """Raised by :func:`load_image` with one of the BAD_REASONS keys."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------- images
def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize(im: Image.Image, size: int, mode: str = "shorter_crop") -> Image.Image:
    if mode == "squash":
        return im.resize((size, size), Image.Resampling.BICUBIC)
    # ImageOps.fit crops the centre to the target aspect, then resizes: the same as
    # resizing the shorter side to `size` and centre-cropping the longer one
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def load_image(path: Path, size: int, mode: str = "shorter_crop") -> np.ndarray:
    """Decode one image file -> uint8 [size, size, 3]; raises :class:`BadImage`."""
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing_file") from None
    if not path.is_file():
        raise BadImage("missing_file", "not a regular file")
    if nbytes == 0:
        raise BadImage("zero_byte_file")
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale (>= size), much faster
            im = ImageOps.exif_transpose(im)
            im.load()
            out = resize(to_rgb(im), size, mode)
            return np.asarray(out, dtype=np.uint8)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImage("undecodable_image", f"{type(err).__name__}: {err}".splitlines()[0][:200]) from None


# ----------------------------------------------------------------------- selection
def fraction_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a nested subset of ``range(n)``: rank by one seeded permutation,
    keep the first ceil(fraction * n). Smaller fractions are subsets of larger ones."""
    if fraction >= 1.0:
        return np.arange(n)
    perm = np.random.default_rng(np.random.SeedSequence([seed, FRACTION_SEED_KEY])).permutation(n)
    return np.sort(perm[:nested_count(n, fraction)])


@dataclass
class _Skips:
    """Bad items in ``skip`` mode (or the first one in ``error`` mode, raised at once)."""

    mode: str
    json_path: Path
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, reason: str, split: str, where: str, path: Optional[Path] = None, detail: str = "") -> None:
        if self.mode == "error":
            what = f"{path}: " if path is not None else ""
            extra = f" [{detail}]" if detail else ""
            raise DataError(
                f"{what}{BAD_REASONS[reason]}{extra} ({where} in {self.json_path.name}); "
                "set data.on_bad_item=skip to leave such items out"
            )
        rec = {"reason": reason, "split": split, "item": where}
        if path is not None:
            rec["file"] = str(path)
        if detail:
            rec["detail"] = detail
        self.items.append(rec)

    def counts(self) -> dict[str, int]:
        out = {r: 0 for r in BAD_REASONS}
        for rec in self.items:
            out[rec["reason"]] += 1
        return out


def check_groups(items: list[KarpathyImage], json_path: Path) -> None:
    """Every ``group`` present must be an integer id or null (one-line DataError naming the field)."""
    for it in items:
        if "group" not in it.extra:
            continue
        group = it.extra["group"]
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
            raise DataError(f"{json_path}: images[{it.index}].group: expected an integer group id or null "
                            f"(got {group!r:.80})")


@dataclass
class _Image:
    item: KarpathyImage
    captions: list[tuple[str, str]]  # (raw, clean)


def _select(items: list[KarpathyImage], cfg: Any, skips: _Skips, clean: Callable[[str], str],
            json_path: Path) -> dict[str, list[_Image]]:
    """Duplicates, the training fraction and caption cleaning (all before any decoding)."""
    by_split: dict[str, list[KarpathyImage]] = {s: [] for s in SPLITS}
    seen: dict[str, KarpathyImage] = {}
    for it in items:
        first = seen.get(it.relpath)
        if first is not None:
            skips.add("duplicate_filename", it.split, it.where, detail=f"also images[{first.index}]")
            continue
        seen[it.relpath] = it
        by_split[it.split].append(it)
    for split, lst in by_split.items():
        if not lst:
            raise DataError(f"{json_path}: split '{split}' has no images")
    train = by_split["train"]
    by_split["train"] = [train[i] for i in fraction_subset(len(train), cfg.data.fraction, cfg.seed)]

    out: dict[str, list[_Image]] = {}
    for split, lst in by_split.items():
        kept: list[_Image] = []
        for it in lst:
            cleaned = [clean(raw) for raw in it.sentences]
            if not any(cleaned):  # the image goes as a whole: one record, not one per caption
                skips.add("all_captions_empty", split, it.where, detail=f"{len(cleaned)} captions")
                continue
            for k, (raw, text) in enumerate(zip(it.sentences, cleaned)):
                if not text:
                    skips.add("empty_caption", split, f"images[{it.index}].sentences[{k}] ({it.relpath})",
                              detail=repr(raw[:80]))
            kept.append(_Image(it, [(raw, text) for raw, text in zip(it.sentences, cleaned) if text]))
        out[split] = kept
    return out


def _decode_split(split: str, images: list[_Image], raw_dir: Path, cfg: Any, skips: _Skips,
                  scratch: np.ndarray, workers: int) -> list[int]:
    """Decode into ``scratch`` rows; returns the positions that decoded (in order)."""
    from tqdm.auto import tqdm

    size, mode = cfg.data.image_size, cfg.data.resize

    def work(pos: int) -> tuple[int, Optional[BadImage]]:
        try:
            scratch[pos] = load_image(image_path(raw_dir, images[pos].item), size, mode)
            return pos, None
        except BadImage as bad:
            return pos, bad

    ok: list[int] = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    bar = tqdm(total=len(images), desc=f"preprocess {split}", unit="img", disable=None, leave=False)
    try:
        # both maps keep input order, so in error mode the first bad item of the file is reported
        results = pool.map(work, range(len(images))) if pool else map(work, range(len(images)))
        for pos, bad in results:
            _record(pos, bad, ok, split, images, raw_dir, skips)
            bar.update()
    finally:
        bar.close()
        if pool is not None:  # on an error, do not decode the rest of the split first
            pool.shutdown(wait=True, cancel_futures=True)
    return ok


def _record(pos: int, bad: Optional[BadImage], ok: list[int], split: str, images: list[_Image],
            raw_dir: Path, skips: _Skips) -> None:
    if bad is None:
        ok.append(pos)
    else:
        it = images[pos].item
        skips.add(bad.reason, split, it.where, path=image_path(raw_dir, it), detail=bad.detail)


def _write_split(split_dir: Path, images: list[_Image], rows: list[int], scratch: np.ndarray,
                 tok: Any, max_tokens: int) -> dict[str, int]:
    import pandas as pd

    n = len(rows)
    with open_memmap_atomic(split_dir / "images.npy", np.uint8, (n,) + scratch.shape[1:]) as out:
        for start in range(0, n, _COPY_ROWS):
            out[start : start + _COPY_ROWS] = scratch[rows[start : start + _COPY_ROWS]]

    image_index, raws, cleans, info = [], [], [], []
    for new_idx, pos in enumerate(rows):
        img = images[pos]
        for raw, cleaned in img.captions:
            image_index.append(new_idx)
            raws.append(raw)
            cleans.append(cleaned)
        it = img.item
        info.append({"filename": it.filename, "filepath": it.filepath, "source_id": it.source_id,
                     "json_index": it.index, **it.extra})
    table = pd.DataFrame({
        "caption_id": np.arange(len(raws), dtype=np.int64),
        "image_index": np.asarray(image_index, dtype=np.int64),
        "raw": raws,
        "clean": cleans,
    })
    with atomic_path(split_dir / "captions.parquet", suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)
    ids, mask = tokenize(tok, cleans, max_tokens)
    save_npy(split_dir / "tokens.npy", ids)
    save_npy(split_dir / "attention_mask.npy", mask)
    write_json(split_dir / "images.json", info, indent=1)
    return {"images": n, "captions": len(raws)}


def run_preprocess(cfg: Any, raw_dir: str | Path, out_dir: str | Path = Path("data/prepared"),
                   reports_dir: str | Path = Path("reports/preprocess"),
                   workers: Optional[int] = None) -> dict[str, Any]:
    """Preprocess ``raw_dir`` (= ``<data.root>/<data.name>``) into ``out_dir``; returns the summary."""
    raw_dir, out_dir, reports_dir = Path(raw_dir), Path(out_dir), Path(reports_dir)
    d = cfg.data
    json_path = dataset_json(raw_dir, d.name)
    items = read_karpathy(json_path)
    check_groups(items, json_path)
    skips = _Skips(d.on_bad_item, json_path)
    tok = load_tokenizer(d.tokenizer)
    info = TokenizerInfo.of(d.tokenizer, tok)
    selected = _select(items, cfg, skips, cleaner_from_config(d), json_path)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    json_counts = {s: sum(1 for it in items if it.split == s) for s in SPLITS}
    counts: dict[str, dict[str, int]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    decoded: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix=".scratch.", dir=out_dir) as tmp:
        scratches = {}
        for split in SPLITS:  # decode (and find every bad item) before writing anything
            imgs = selected[split]
            shape = (max(1, len(imgs)), d.image_size, d.image_size, 3)
            scratches[split] = np.lib.format.open_memmap(Path(tmp) / f"{split}.npy", mode="w+",
                                                         dtype=np.uint8, shape=shape)
            decoded[split] = _decode_split(split, imgs, raw_dir, cfg, skips, scratches[split], workers)
            if not decoded[split]:
                write_json(reports_dir / "summary.json", _summary(d, {}, skips))
                raise DataError(f"{json_path}: split '{split}' has no images left after skipping bad items "
                                f"(listed in {reports_dir / 'summary.json'})")
        for split in SPLITS:
            counts[split] = _write_split(out_dir / split, selected[split], decoded[split], scratches[split],
                                         tok, d.max_tokens)
            counts[split]["images_in_json"] = json_counts[split]
        del scratches

    meta = {
        "dataset": d.name,
        "tokenizer": info.name,
        "vocab_size": info.vocab_size,
        "pad_token_id": info.pad_token_id,
        "cls_token_id": info.cls_token_id,
        "sep_token_id": info.sep_token_id,
        "mask_token_id": info.mask_token_id,
        "max_tokens": d.max_tokens,
        "image_size": d.image_size,
        "resize": d.resize,
        "fraction": d.fraction,
        "seed": cfg.seed,
        "cleaning": {"lowercase": d.lowercase, "remove_punctuation": d.remove_punctuation,
                     "remove_stopwords": d.remove_stopwords, "max_words": d.max_words},
        "counts": {s: {"images": c["images"], "captions": c["captions"]} for s, c in counts.items()},
    }
    write_json(out_dir / "meta.json", meta)
    summary = _summary(d, counts, skips)
    write_json(reports_dir / "summary.json", summary)
    return summary


def _summary(d: Any, counts: dict[str, Any], skips: _Skips) -> dict[str, Any]:
    return {
        "dataset": d.name,
        "on_bad_item": d.on_bad_item,
        "fraction": d.fraction,
        "counts": counts,
        "skipped": skips.counts(),
        "skipped_total": len(skips.items),
        "skipped_items": skips.items,
    }
