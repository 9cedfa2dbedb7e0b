"""The decoded-array cache: built once per source, then memory-mapped.

Decoded arrays are written to ``<data_dir>/.mhpfedhn-cache/`` when ``data_dir`` is
writable (a folder without any owner write bit counts as read-only even for root),
otherwise to ``$XDG_CACHE_HOME/mh-pfedhn/<sha1 of the absolute source path>/``
(default ``~/.cache/mh-pfedhn/...``): ``<stem>-train-32x32.images.npy``,
``<stem>-train-32x32.labels.npy`` and ``<stem>-train-32x32.json``, the metadata,
written last; ``<stem>`` is the dataset's name (``emnist-<split>`` for an EMNIST
split other than ``byclass``). The metadata records a fingerprint of the source
(file sizes and modification times, or the list of image files of a tree); a cache
whose fingerprint no longer matches is rebuilt. Every file is written to a
temporary name and moved into place with ``os.replace``; building happens under an
exclusive ``fcntl.flock`` on ``<stem>-train-32x32.lock``, so processes that start
together decode only once (the others wait, then read the cache). POSIX only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.common.logger import log

from .images import tree_files
from .registry import IMAGE_SIZE, Dataset, Decoded, Source

__all__ = ["CACHE_DIRNAME", "CACHE_FORMAT", "load_or_build"]

CACHE_DIRNAME = ".mhpfedhn-cache"
CACHE_FORMAT = 1


def _fingerprint(source: Source) -> dict[str, Any]:
    """What must not change for a cache built from ``source`` to stay valid."""
    path = source.path.resolve()
    fp: dict[str, Any] = {"kind": source.kind, "path": str(path)}
    if source.kind == "folder":
        listing = "\n".join(
            f"{cls}/{f}" for cls, files in tree_files(path).items() for f in files
        )
        fp["files_sha1"] = hashlib.sha1(listing.encode()).hexdigest()
    else:
        if source.files:
            files = list(source.files)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
        else:
            files = [path]
        fp["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    return fp


def _writable_dir(path: Path) -> bool:
    """True if we may create files in ``path``. A folder without any owner write bit is
    treated as read-only even for root (who would otherwise write into it)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and bool(st.st_mode & stat.S_IWUSR)
        and os.access(path, os.W_OK | os.X_OK)
    )


def _cache_dir(data_dir: Path, source: Source) -> Path:
    local = data_dir / CACHE_DIRNAME
    if _writable_dir(local) or (not local.exists() and _writable_dir(data_dir)):
        try:
            local.mkdir(exist_ok=True)
            return local
        except OSError:
            pass
    base = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mh-pfedhn"
    )
    fallback = base / hashlib.sha1(str(source.path.resolve()).encode()).hexdigest()
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _CacheFiles:
    images: Path
    labels: Path
    meta: Path
    lock: Path

    @classmethod
    def at(cls, cache_dir: Path, stem: str) -> _CacheFiles:
        stem = f"{stem}-train-{IMAGE_SIZE}x{IMAGE_SIZE}"
        return cls(
            *(
                cache_dir / f"{stem}{ext}"
                for ext in (".images.npy", ".labels.npy", ".json", ".lock")
            )
        )

    def read(
        self, fingerprint: dict[str, Any], channels: int | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """The cached arrays if they exist and were built from this exact source.

        ``channels``: the channel count the images must have; None to take it from
        the metadata (``imagefolder``, whose older caches lack it and are rebuilt).
        """
        try:
            meta = json.loads(self.meta.read_text())
            if meta.get("format") != CACHE_FORMAT or meta.get("source") != fingerprint:
                return None
            images = np.load(self.images, mmap_mode="r")
            labels = np.load(self.labels)
        except (OSError, ValueError):
            return None
        n = meta["num_samples"]
        channels = channels if channels is not None else meta.get("channels")
        if (
            images.shape != (n, IMAGE_SIZE, IMAGE_SIZE, channels)
            or images.dtype != np.uint8
            or labels.shape != (n,)
        ):
            return None
        return images, labels.astype(np.int64, copy=False), meta

    def write(self, decoded: Decoded, meta: dict[str, Any]) -> None:
        _atomic_write(
            self.images, lambda f: np.save(f, np.ascontiguousarray(decoded.images))
        )
        _atomic_write(self.labels, lambda f: np.save(f, decoded.labels))
        _atomic_write(self.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _decode(dataset: Dataset, source: Source) -> Decoded:
    """Decode ``source`` with ``dataset``: every cache build goes through here."""
    return dataset.decode(source)


def load_or_build(
    dataset: Dataset, data_dir: Path, source: Source
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read the cache of ``source``, building it (once, under a lock) if absent."""
    fingerprint = _fingerprint(source)
    files = _CacheFiles.at(_cache_dir(data_dir, source), dataset.cache_stem)
    channels = dataset.cached_channels
    cached = files.read(fingerprint, channels)
    if cached is not None:
        return cached
    with _exclusive_lock(files.lock):
        # another process may have built it meanwhile
        cached = files.read(fingerprint, channels)
        if cached is not None:
            return cached
        start = time.perf_counter()
        decoded = _decode(dataset, source)
        dataset.finish(decoded)
        seconds = time.perf_counter() - start
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "dataset": dataset.cache_stem,
            "source": fingerprint,
            "num_samples": len(decoded.labels),
            "channels": int(decoded.images.shape[-1]),
            "classes": decoded.classes,
            "decode_seconds": round(seconds, 3),
        }
        meta.update(dataset.extra_meta(decoded))
        files.write(decoded, meta)
        log(
            INFO,
            "decoded %d %s images from %s in %.1f s; cached in %s",
            *(len(decoded.labels), dataset.cache_stem, source.path, seconds),
            files.images.parent,
        )
    cached = files.read(fingerprint, channels)
    if cached is None:
        raise RuntimeError(f"cache {files.meta} unreadable right after writing it")
    return cached
