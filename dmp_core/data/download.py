"""The download stage: make ``<data.root>/<data.name>/`` hold a complete Karpathy-layout set.

* ``synthetic``: generated locally (deterministic from the seed); regenerated only
  when the files on disk were made with other parameters.
* ``flickr8k`` / ``flickr30k`` / ``coco``: when the split file or the images are
  absent, they are fetched from their public sources (HTTP with resume via Range
  requests and a tqdm progress bar, or the Hugging Face hub), verified against a
  checksum where one is known, and unpacked. Without network (or with
  ``HF_HUB_OFFLINE=1`` / ``DMP_OFFLINE=1``) the stage fails with one line saying what
  is missing and where to put it.
* any other name (``data.name: myset``): a Karpathy-format set the user placed; it must
  already hold ``dataset_<name>.json`` and ``images/``.

When the data is already present the stage only validates it: the split file
parses, every split has images, and every listed image file exists (a missing file
is an error with ``data.on_bad_item=error``, otherwise a warning; preprocess then
skips and counts it). The stage then writes the manifest (:mod:`dmp_core.data.manifest`)
that DVC tracks in place of the raw folder.

Where ``data.root`` points (:func:`resolve_root`): an absolute path is used as is. A
relative path is resolved against the *working directory* for ``synthetic`` (generated
data: a queued DVC experiment regenerates it in its own copy of the project) and
against the *real project root* for every other set (:func:`dmp_core.tracking.project_root`
maps a DVC experiment's temporary copy under ``.dvc/tmp/exps/`` back to it), because git
does not copy untracked data into those copies.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dmp_core.config import DOWNLOADABLE
from dmp_core.data import synthetic
from dmp_core.data.karpathy import IMAGES_DIR, SPLITS, dataset_json, image_path, read_karpathy
from dmp_core.errors import DataError
from dmp_core.io import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One downloadable file: an HTTP(S)/file:// ``url`` or a Hugging Face dataset file."""

    url: Optional[str] = None
    hub_repo: Optional[str] = None  # dataset repo id, e.g. "nlphuji/flickr30k"
    hub_file: Optional[str] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None

    @property
    def name(self) -> str:
        if self.url:
            return Path(urllib.parse.urlparse(self.url).path).name
        return Path(self.hub_file or "download").name

    @property
    def remote(self) -> bool:
        if self.url:
            return urllib.parse.urlparse(self.url).scheme in ("http", "https")
        return not os.environ.get("DMP_HUB_MIRROR")

    def describe(self) -> str:
        return self.url or f"https://huggingface.co/datasets/{self.hub_repo} ({self.hub_file})"


@dataclass(frozen=True)
class ImageArchive:
    """A zip of images; image members are unpacked flat into ``images/<subdir>/``."""

    source: Source
    subdir: str = ""


# Karpathy's split files for all three datasets live in one zip; tried in order.
KARPATHY_SOURCES: tuple[Source, ...] = (
    Source(url="https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"),
    Source(hub_repo="gpantaz/karpathy_split", hub_file="caption_datasets.zip"),
)
IMAGE_SOURCES: dict[str, tuple[ImageArchive, ...]] = {
    "flickr8k": (ImageArchive(Source(url="https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip")),),
    "flickr30k": (ImageArchive(Source(hub_repo="nlphuji/flickr30k", hub_file="flickr30k-images.zip")),),
    "coco": (
        ImageArchive(Source(url="http://images.cocodataset.org/zips/train2014.zip"), subdir="train2014"),
        ImageArchive(Source(url="http://images.cocodataset.org/zips/val2014.zip"), subdir="val2014"),
    ),
}


def project_base(cfg: Any, cwd: str | Path | None = None) -> Path:
    """The folder a relative ``data.root`` (and the hash cache) is resolved against: the
    working directory for ``synthetic``, else the real project root (see the module docstring)."""
    if cfg.data.name == "synthetic":
        return Path(cwd or os.getcwd()).resolve()
    from dmp_core.tracking import project_root

    return project_root(cwd)


def resolve_root(cfg: Any, cwd: str | Path | None = None) -> Path:
    """``data.root`` as an absolute path (absolute: as is; relative: see :func:`project_base`)."""
    root = Path(cfg.data.root).expanduser()
    return root if root.is_absolute() else project_base(cfg, cwd) / root


def dataset_dir(cfg: Any, cwd: str | Path | None = None) -> Path:
    """``<data.root>/<data.name>``, resolved (see :func:`resolve_root`)."""
    return resolve_root(cfg, cwd) / cfg.data.name


def default_cache_dir(cfg: Any, cwd: str | Path | None = None) -> Path:
    """``data/cache`` of the project the data root is resolved against (git-ignored): queued
    DVC experiments on a real set share the workspace's hashes instead of re-reading every file."""
    return project_base(cfg, cwd) / "data" / "cache"


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "DMP_OFFLINE"))


# ------------------------------------------------------------------------ fetching
def _checksum_ok(path: Path, source: Source) -> bool:
    for algo, want in (("sha256", source.sha256), ("md5", source.md5)):
        if want:
            h = hashlib.new(algo)
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(_CHUNK), b""):
                    h.update(block)
            if h.hexdigest().lower() != want.lower():
                return False
    return True


def fetch_url(url: str, dest: str | Path, *, sha256: Optional[str] = None, md5: Optional[str] = None,
              timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, resuming a ``dest.part`` left by an
    interrupted run (HTTP Range), and verify the checksum when given. ``file://`` URLs are
    copied with the same resume logic."""
    import requests
    from tqdm.auto import tqdm

    dest = Path(dest)
    source = Source(url=url, sha256=sha256, md5=md5)
    if dest.is_file() and (sha256 or md5) and _checksum_ok(dest, source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    parsed = urllib.parse.urlparse(url)

    if parsed.scheme == "file":
        src = Path(urllib.request.url2pathname(parsed.path))
        if not src.is_file():
            raise DataError(f"{url}: file not found")
        total = src.stat().st_size
        start = start if start <= total else 0
        with open(src, "rb") as fin, open(part, "ab" if start else "wb") as fout, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
            fin.seek(start)
            for block in iter(lambda: fin.read(_CHUNK), b""):
                fout.write(block)
                bar.update(len(block))
    else:
        headers = {"Range": f"bytes={start}-"} if start else {}
        with requests.get(url, stream=True, headers=headers, timeout=timeout) as resp:
            if resp.status_code == 416:  # the .part already holds the whole file
                pass
            else:
                if resp.status_code not in (200, 206):
                    raise DataError(f"{url}: HTTP {resp.status_code}")
                if resp.status_code == 200:  # the server ignored Range: start over
                    start = 0
                length = int(resp.headers.get("Content-Length") or 0)
                total = start + length if length else None
                with open(part, "ab" if start else "wb") as fout, \
                        tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=dest.name,
                             disable=None) as bar:
                    for block in resp.iter_content(chunk_size=_CHUNK):
                        fout.write(block)
                        bar.update(len(block))
    if not _checksum_ok(part, source):
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: checksum mismatch for the downloaded file (deleted {part.name}; run again)")
    os.replace(part, dest)
    return dest


def fetch_hub(repo_id: str, filename: str, dest_dir: str | Path) -> Path:
    """A file of a Hugging Face *dataset* repo (resumable, cached by huggingface_hub).

    ``DMP_HUB_MIRROR=<dir>`` serves ``<dir>/<repo_id>/<filename>`` instead (a local copy
    laid out like the hub, for air-gapped machines and tests)."""
    dest_dir = Path(dest_dir)
    mirror = os.environ.get("DMP_HUB_MIRROR")
    if mirror:
        src = Path(mirror) / repo_id / filename
        if not src.is_file():
            raise DataError(f"{src}: not in the hub mirror DMP_HUB_MIRROR={mirror}")
        dest = dest_dir / Path(filename).name
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=dest_dir))


def fetch(source: Source, dest_dir: Path) -> Path:
    if source.url:
        return fetch_url(source.url, dest_dir / source.name, sha256=source.sha256, md5=source.md5)
    path = fetch_hub(source.hub_repo or "", source.hub_file or "", dest_dir)
    if not _checksum_ok(path, source):
        raise DataError(f"{source.describe()}: checksum mismatch for {path}")
    return path


def _extract_member(zip_path: Path, member_name: str, dest: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        matches = [n for n in zf.namelist() if Path(n).name == member_name and not n.startswith("__MACOSX")]
        if not matches:
            raise DataError(f"{zip_path}: has no {member_name}")
        with zf.open(matches[0]) as fin, atomic_path(dest) as tmp, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)


def _extract_images(zip_path: Path, dest_dir: Path) -> int:
    """Unpack the image members of a zip flat into ``dest_dir``; returns the count."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if info.is_dir() or info.filename.startswith("__MACOSX") or name.startswith("._"):
                continue
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with zf.open(info) as fin, open(dest_dir / name, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            n += 1
    return n


def _missing_message(root: Path, name: str, need_json: bool, need_images: bool, why: str) -> str:
    parts = []
    if need_json:
        parts.append(f"{dataset_json(root, name)} (Karpathy split file dataset_{name}.json from "
                     f"{KARPATHY_SOURCES[0].describe()})")
    if need_images:
        hint = " (train2014/ and val2014/ subfolders)" if name == "coco" else ""
        srcs = ", ".join(a.source.describe() for a in IMAGE_SOURCES[name])
        parts.append(f"{root / IMAGES_DIR}/{hint} (the {name} images, from {srcs})")
    return f"{name} data missing: put " + " and ".join(parts) + f"; {why}"


def download_real(root: Path, name: str) -> None:
    """Fetch what is missing of a real dataset into ``root`` (split file, images)."""
    json_path = dataset_json(root, name)
    images = root / IMAGES_DIR
    need_json, need_images = not json_path.is_file(), not images.is_dir()
    if not (need_json or need_images):
        return
    needed = ([s for s in KARPATHY_SOURCES] if need_json else []) + \
             ([a.source for a in IMAGE_SOURCES[name]] if need_images else [])
    if offline() and any(s.remote for s in needed):
        raise DataError(_missing_message(root, name, need_json, need_images,
                                         "downloads are off (HF_HUB_OFFLINE or DMP_OFFLINE is set)"))
    downloads = root / "downloads"
    try:
        if need_json:
            errors = []
            for source in KARPATHY_SOURCES:
                try:
                    _extract_member(fetch(source, downloads), json_path.name, json_path)
                    break
                except Exception as err:  # try the next mirror
                    errors.append(f"{source.describe()}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            else:
                raise DataError("; ".join(errors))
        if need_images:
            partial = Path(tempfile.mkdtemp(prefix=".images.", dir=root))
            try:
                for archive in IMAGE_SOURCES[name]:
                    zip_path = fetch(archive.source, downloads)
                    n = _extract_images(zip_path, partial / archive.subdir)
                    print(f"unpacked {n} images from {zip_path.name}", file=sys.stderr)
                os.replace(partial, images)  # images/ appears only once complete
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            shutil.rmtree(downloads, ignore_errors=True)
    except DataError as err:
        raise DataError(_missing_message(root, name, need_json, need_images, f"download failed: {err}")) from None
    except Exception as err:  # network and hub errors of every kind
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise DataError(_missing_message(root, name, need_json, need_images, f"download failed: {reason}")) from None


# ---------------------------------------------------------------------- validation
def validate_dataset(root: str | Path, name: str, on_bad_item: str = "error") -> dict[str, Any]:
    """Check a Karpathy-layout set without decoding images; returns counts per split."""
    root = Path(root)
    items = read_karpathy(dataset_json(root, name))
    if not (root / IMAGES_DIR).is_dir():
        raise DataError(f"{root / IMAGES_DIR}: image folder not found")
    counts = {s: {"images": 0, "captions": 0} for s in SPLITS}
    missing = []
    for it in items:
        counts[it.split]["images"] += 1
        counts[it.split]["captions"] += len(it.sentences)
        if not image_path(root, it).is_file():
            missing.append(it)
    for split in SPLITS:
        if counts[split]["images"] == 0:
            raise DataError(f"{dataset_json(root, name)}: split '{split}' has no images")
    if missing:
        first = missing[0]
        msg = (f"{image_path(root, first)}: image file not found ({first.where} in dataset_{name}.json; "
               f"{len(missing)} of {len(items)} listed files missing)")
        if on_bad_item == "error":
            raise DataError(msg + "; set data.on_bad_item=skip to leave them out")
        print(f"warning: {msg}; preprocess will skip them", file=sys.stderr)
    return {"dataset": name, "dir": str(root), "splits": counts, "missing_files": len(missing)}


def require_present(root: Path, name: str) -> None:
    """A set with no download source (any name but synthetic/flickr8k/flickr30k/coco) must
    already be in place: one line naming both paths otherwise."""
    json_path, images = dataset_json(root, name), root / IMAGES_DIR
    lacking = [str(p) for p, ok in ((json_path, json_path.is_file()), (images, images.is_dir())) if not ok]
    if lacking:
        raise DataError(f"dataset '{name}' not found: {' and '.join(lacking)} missing; data.name={name} has no "
                        f"download source, so put a Karpathy-format split file at {json_path} and its images "
                        f"under {images}/ (see docs/DATA.md), or set data.root to the folder that holds {name}/")


def run_download(cfg: Any) -> Path:
    """Make ``<data.root>/<data.name>`` complete and valid; returns that folder."""
    return download_and_validate(cfg)[0]


def download_and_validate(cfg: Any) -> tuple[Path, dict[str, Any]]:
    """:func:`run_download` that also returns the validation counts (for the stage's summary)."""
    d = cfg.data
    root = dataset_dir(cfg)
    if d.name == "synthetic":
        kw = dict(seed=cfg.seed, image_size=d.image_size, synthetic_params=d.synthetic)
        if not synthetic.is_current(root, **kw):
            synthetic.generate_synthetic(root, **kw)
    elif d.name in DOWNLOADABLE:
        download_real(root, d.name)
    else:
        require_present(root, d.name)
    return root, validate_dataset(root, d.name, d.on_bad_item)


def download_with_manifest(cfg: Any, manifest_path: str | Path,
                           cache_dir: Optional[str | Path] = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The whole download stage: :func:`download_and_validate`, then write the manifest
    (:mod:`dmp_core.data.manifest`) to ``manifest_path``; ``cache_dir`` defaults to
    :func:`default_cache_dir`. Returns (dataset folder, validation report, manifest)."""
    from dmp_core.data.manifest import build_manifest, write_manifest

    root, report = download_and_validate(cfg)
    manifest = build_manifest(root, cfg.data.name, on_bad_item=cfg.data.on_bad_item,
                              cache_dir=cache_dir if cache_dir is not None else default_cache_dir(cfg))
    write_manifest(manifest_path, manifest)
    return root, report, manifest
