"""The dataset manifest: what the download stage hands to DVC in place of the raw folder.

DVC 3 cannot track outputs outside the repository, and a raw dataset may live anywhere
(``/data/flickr30k``, a read-only shared disk). So the download stage writes a small
file inside the project, ``data/manifest.json``, that describes the raw set exactly:

* the dataset name;
* the split file ``dataset_<name>.json``: its name relative to the dataset folder, its
  size in bytes and its MD5;
* every image file the split file lists (each once, sorted by path): path relative to
  the dataset folder (``images/[<filepath>/]<filename>``), size in bytes and MD5;
* with ``data.on_bad_item=skip``: the listed files that are missing, each with the
  JSON entry that names it (``images[12]``), and counts.

No absolute paths, no modification times: an unchanged folder gives a byte-identical
manifest, so DVC skips preprocessing; a replaced image or an edited caption changes an
MD5, so preprocessing re-runs. The preprocess stage depends on the manifest, not on the
folder.

Hashing a large set (COCO: 123k files, 19 GB) takes minutes, so MD5s are cached in a
:class:`HashCache` keyed by (relative path, size, mtime_ns, ctime_ns): a file whose
stat is unchanged is not read again. The cache lives in the project (``data/cache/``,
git-ignored), one file per dataset folder, never inside the dataset folder itself,
which may be read-only or shared with other users.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dmp_core.data.karpathy import IMAGES_DIR, SPLITS, KarpathyImage, dataset_json, read_karpathy
from dmp_core.errors import DataError
from dmp_core.io import write_json, write_text

MANIFEST_FORMAT = 1
CACHE_FORMAT = 1
# a file modified this close to the moment it was hashed could change again within the
# same mtime tick without changing its stat ("racy" entries, as git calls them): such
# entries are not cached, so they are hashed again next time
_RACY_NS = 2_000_000_000


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes (hashlib releases the GIL while hashing, so threads help)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "md5").hexdigest()
    except OSError as err:  # unreadable (permissions, I/O error): one line naming the file
        raise DataError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None


# ------------------------------------------------------------------------ hash cache
@dataclass
class HashCache:
    """(relative path, size, mtime_ns, ctime_ns) -> MD5 for the files of one dataset folder.

    ``path`` is the cache file (JSON); a missing, unreadable or foreign cache file is
    treated as empty (the cache only saves time, it never decides content)."""

    path: Optional[Path]
    dataset_dir: str
    entries: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def load(cls, cache_dir: Optional[Path], dataset_dir: Path, name: str) -> "HashCache":
        """The cache of ``dataset_dir`` in ``cache_dir`` (None: a cache that is never saved)."""
        key = str(dataset_dir.resolve())
        if cache_dir is None:
            return cls(None, key)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"hashes-{name}-{digest}.json"
        cache = cls(path, key)
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") == CACHE_FORMAT and doc.get("dataset_dir") == key:
                cache.entries = {rel: tuple(v) for rel, v in doc["files"].items()  # type: ignore[misc]
                                 if isinstance(v, list) and len(v) == 4}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return cache

    def lookup(self, rel: str, st: os.stat_result) -> Optional[str]:
        hit = self.entries.get(rel)
        if hit is not None and hit[:3] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            self.hits += 1
            return hit[3]
        self.misses += 1
        return None

    def save(self, current: dict[str, tuple[int, int, int, str]], hashed_at_ns: int) -> None:
        """Replace the entries with ``current`` (files no longer listed drop out), leaving
        out racy ones; written atomically, so concurrent runs cannot corrupt it."""
        if self.path is None:
            return
        keep = {rel: v for rel, v in sorted(current.items())
                if max(v[1], v[2]) < hashed_at_ns - _RACY_NS}
        try:
            write_json(self.path, {"format": CACHE_FORMAT, "dataset_dir": self.dataset_dir, "files": keep},
                       indent=0)
        except OSError:  # a read-only project: the manifest is still right, only slower next time
            pass


# -------------------------------------------------------------------------- manifest
def _listed_files(items: list[KarpathyImage]) -> dict[str, KarpathyImage]:
    """Relative path (``images/...``) -> the first JSON entry listing it, sorted by path."""
    first: dict[str, KarpathyImage] = {}
    for it in items:
        first.setdefault(f"{IMAGES_DIR}/{it.relpath}", it)
    return dict(sorted(first.items()))


def _stat(path: Path) -> Optional[os.stat_result]:
    """The file's stat, or None when it is missing or not a regular file."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    return st if stat.S_ISREG(st.st_mode) else None


def _hash(dataset_dir: Path, stats: dict[str, os.stat_result], cache: HashCache, name: str,
          workers: int) -> tuple[dict[str, str], int]:
    """MD5 of every file in ``stats`` (cached ones are not read); returns (digests, files read)."""
    from tqdm.auto import tqdm

    hashed_at = time.time_ns()
    digests: dict[str, str] = {}
    todo = []
    for rel, st in stats.items():
        md5 = cache.lookup(rel, st)
        if md5 is None:
            todo.append(rel)
        else:
            digests[rel] = md5
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(todo), desc=f"hashing {name}", unit="file", disable=None, leave=False) as bar:
        for rel, md5 in zip(todo, pool.map(lambda r: file_md5(dataset_dir / r), todo)):
            digests[rel] = md5
            bar.update()
    cache.save({rel: (st.st_size, st.st_mtime_ns, st.st_ctime_ns, digests[rel]) for rel, st in stats.items()},
               hashed_at)
    return digests, len(todo)


def _split_counts(items: list[KarpathyImage]) -> dict[str, dict[str, int]]:
    counts = {s: {"images": 0, "captions": 0} for s in SPLITS}
    for it in items:
        counts[it.split]["images"] += 1
        counts[it.split]["captions"] += len(it.sentences)
    return counts


def build_manifest(dataset_dir: str | Path, name: str, *, on_bad_item: str = "error",
                   cache_dir: Optional[str | Path] = None, workers: Optional[int] = None) -> dict[str, Any]:
    """Describe ``dataset_dir`` (= ``<data.root>/<data.name>``) for DVC; see the module docstring.

    A listed image file that is missing raises :class:`DataError` naming the file and its
    JSON entry with ``on_bad_item="error"``; with ``"skip"`` it is listed under
    ``missing``. Returns the manifest dict plus a ``_stats`` entry (files hashed / reused
    from the cache) that :func:`manifest_text` leaves out."""
    dataset_dir = Path(dataset_dir)
    json_path = dataset_json(dataset_dir, name)
    items = read_karpathy(json_path)
    listed = _listed_files(items)

    found: dict[str, os.stat_result] = {}
    missing: list[str] = []
    for rel in listed:
        st = _stat(dataset_dir / rel)
        if st is None:
            missing.append(rel)
        else:
            found[rel] = st
    if missing and on_bad_item == "error":
        first = listed[missing[0]]
        raise DataError(f"{dataset_dir / missing[0]}: image file not found ({first.where} in {json_path.name}; "
                        f"{len(missing)} of {len(listed)} listed files missing); "
                        "set data.on_bad_item=skip to leave them out")

    cache = HashCache.load(Path(cache_dir) if cache_dir is not None else None, dataset_dir, name)
    split_st = json_path.stat()  # hashed (and cached) like the images: COCO's is 140 MB
    digests, n_hashed = _hash(dataset_dir, {json_path.name: split_st, **found}, cache, name,
                              workers or min(8, os.cpu_count() or 1))
    files = [{"path": rel, "bytes": st.st_size, "md5": digests[rel]} for rel, st in found.items()]
    return {
        "format": MANIFEST_FORMAT,
        "dataset": name,
        "split_file": {"path": json_path.name, "bytes": split_st.st_size, "md5": digests[json_path.name]},
        "splits": _split_counts(items),
        "counts": {"files": len(files), "bytes": sum(f["bytes"] for f in files), "missing": len(missing)},
        "missing": [{"path": rel, "item": f"images[{listed[rel].index}]"} for rel in missing],
        "files": files,
        "_stats": {"hashed": n_hashed, "reused": cache.hits},  # not written: it differs run to run
    }


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as JSON text, one file per line (diffable, ~100 bytes per file).

    Keys sorted, no floats, no absolute paths, no times: equal content, equal bytes."""
    doc = {k: v for k, v in manifest.items() if not k.startswith("_")}
    head = {k: v for k, v in doc.items() if k not in ("files", "missing")}
    lines = ["{"]
    for key in sorted(head):
        lines.append(f"  {json.dumps(key)}: {json.dumps(head[key], sort_keys=True)},")
    for key in ("missing", "files"):
        rows = [json.dumps(row, sort_keys=True) for row in doc.get(key, [])]
        body = ("[\n    " + ",\n    ".join(rows) + "\n  ]") if rows else "[]"
        lines.append(f"  {json.dumps(key)}: {body}{',' if key == 'missing' else ''}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically; an identical manifest leaves the file's bytes as they were."""
    return write_text(path, manifest_text(manifest))


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (run `dmp download` first)") from None
    except ValueError as err:
        raise DataError(f"{path}: malformed manifest: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a manifest of format {MANIFEST_FORMAT}")
    return doc
