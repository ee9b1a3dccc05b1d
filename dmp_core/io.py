"""Atomic file writes: a killed process never leaves a half-written output.

Each writer writes to a temporary file in the destination folder, fsyncs it and
renames it over the destination (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest``.

    On an exception the temporary file is removed and ``dest`` is left untouched.
    ``suffix`` keeps an extension that writers such as ``np.save`` insist on.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(dest: str | Path, writer: Callable[[Path], Any]) -> Path:
    with atomic_path(dest) as tmp:
        writer(tmp)
    return Path(dest)


def write_bytes(dest: str | Path, data: bytes) -> Path:
    return atomic_write(dest, lambda p: p.write_bytes(data))


def write_text(dest: str | Path, text: str) -> Path:
    return atomic_write(dest, lambda p: p.write_text(text))


def write_json(dest: str | Path, obj: Any, indent: int = 2) -> Path:
    return write_text(dest, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def save_npy(dest: str | Path, array: np.ndarray) -> Path:
    def _save(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    return atomic_write(dest, _save)


def save_npz(dest: str | Path, **arrays: np.ndarray) -> Path:
    def _save(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(dest, _save)


@contextlib.contextmanager
def open_memmap_atomic(dest: str | Path, dtype: Any, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A writable ``.npy`` memmap that appears at ``dest`` only once fully written."""
    from numpy.lib.format import open_memmap

    with atomic_path(dest) as tmp:
        arr = open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield arr
        arr.flush()
        del arr


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
