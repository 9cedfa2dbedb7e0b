"""Image files to 32x32 ``uint8`` arrays: trees of class folders and their archives.

Shared by the families whose data are image files (CIFAR's image-folder copies,
Tiny-ImageNet, ``imagefolder``). :class:`ImageTree` is their base: a tree
``<root>/<class>/**/<image>`` found in one of :meth:`ImageTree.folder_candidates`,
or the same tree packed in :meth:`ImageTree.archive_path` (``.tar.gz`` or ``.zip``,
read in place: the members are streamed and decoded in memory, so nothing but the
cache is written and no member path ever reaches the file system).

Image files are those with a common image suffix (``.jpg .jpeg .png .bmp .gif .tif
.tiff .webp .ppm .pgm``, any case); hidden files are skipped; inside a class folder
images are found recursively (Tiny-ImageNet keeps them in ``<class>/images/``) and
ordered by relative path, so a tree and its archive give identical arrays. The label
of an image is the index of its class folder in sorted order.

Every image whose size is not 32x32 is resized to 32x32 with PIL's bilinear filter
(what ``torchvision.transforms.Resize((32, 32))`` does to a PIL image).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from logging import INFO
from pathlib import Path, PurePosixPath
from typing import IO, ClassVar

import numpy as np
from flwr.common.logger import log
from PIL import Image

from .registry import IMAGE_SIZE, Dataset, Decoded, Source

__all__ = [
    "GRAY_MODES",
    "IMAGE_SUFFIXES",
    "ImageTree",
    "Progress",
    "decode_image",
    "is_image_name",
    "resize",
    "tree_files",
]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
#: PIL modes counted as grayscale by ``imagefolder`` (1 channel if all images are).
GRAY_MODES = frozenset({"1", "L", "LA"})


def resize(img: Image.Image) -> np.ndarray:
    """The pixels of ``img``, resized to 32x32 (PIL bilinear) if it has another size."""
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def decode_image(fp: str | os.PathLike[str] | IO[bytes]) -> tuple[np.ndarray, bool]:
    """Decode one image file to ``uint8`` ``(32, 32, 3)`` and say whether it is
    grayscale (PIL mode in :data:`GRAY_MODES`).

    Colour images: PIL ``convert("RGB")``, then a bilinear resize to 32x32 when the
    image has another size. Grayscale ones are converted to ``L``, resized, and their
    one channel is repeated three times: the same pixels as the RGB path gives them.
    """
    with Image.open(fp) as img:
        gray = img.mode in GRAY_MODES
        mode = "L" if gray else "RGB"
        pixels = resize(img if img.mode == mode else img.convert(mode))
    if gray:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels, gray


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def tree_files(root: Path) -> dict[str, list[str]]:
    """Map each class folder of ``root`` (sorted) to its image files (sorted paths
    relative to the class folder, found recursively)."""
    tree: dict[str, list[str]] = {}
    for class_dir in sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(class_dir)
            files += [(rel / f).as_posix() for f in filenames if is_image_name(f)]
        tree[class_dir.name] = sorted(files)
    return tree


class Progress:
    """Logs a line every ``every`` decoded images: how many, seconds so far and the
    estimated time left (``total`` may be an expected count). ``every = 0``: silent."""

    def __init__(self, name: str, total: int | None, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.count = 0
        self.start = time.perf_counter()

    def step(self) -> None:
        self.count += 1
        if not self.every or self.count % self.every:
            return
        seconds = time.perf_counter() - self.start
        line = f"{self.name}: decoded {self.count:,}"
        if self.total:
            left = seconds * max(self.total - self.count, 0) / self.count
            line += f" / {self.total:,} images in {duration(seconds)}"
            line += f" (about {duration(left)} left)"
        else:
            line += f" images in {duration(seconds)}"
        log(INFO, "%s", line)


def duration(seconds: float) -> str:
    """``42 s`` or ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _archive_members(archive: Path) -> Iterator[tuple[str, bool, Callable[[], bytes]]]:
    """``(path, is_regular_file, read)`` for each member of a tar or zip archive, in
    archive order; ``read()`` returns the member's bytes (nothing is extracted)."""
    if archive.suffix.lower() == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                yield info.filename, not info.is_dir(), lambda i=info: zf.read(i)
        return
    with tarfile.open(archive, "r:*") as tar:

        def read(member: tarfile.TarInfo) -> bytes:
            data = tar.extractfile(member)
            assert data is not None  # regular file
            return data.read()

        for member in tar:
            yield member.name, member.isfile(), lambda m=member: read(m)


class ImageTree(Dataset):
    """Base of the datasets stored as a tree of class folders (or its archive)."""

    #: Log a progress line every so many decoded images (0: never).
    progress_every: ClassVar[int] = 0
    #: How many images the train split should hold (for the progress estimate).
    expected_images: ClassVar[int | None] = None

    def folder_candidates(self, data_dir: Path) -> list[Path]:
        """Where the train tree may lie, by preference."""
        raise NotImplementedError

    def archive_path(self, data_dir: Path) -> Path | None:
        """The archive of the tree that may lie in ``data_dir`` (None: no archive)."""
        return None

    @property
    def archive_prefixes(self) -> tuple[tuple[str, ...], ...]:
        """The folders of an archive that may hold the train tree, by preference."""
        name = self.name
        return ((f"{name}-jpg", "train"), (name, "train"), ("train",))

    def check_classes(self, classes: list[str], where: Path) -> None:
        """Raise ``ValueError`` unless the class folders are usable."""
        if not classes:
            raise ValueError(
                f"{where} holds no class folders with images "
                "(expected <class>/<images>)"
            )

    def find_tree(self, data_dir: Path) -> Source | None:
        for folder in self.folder_candidates(data_dir):
            if folder.is_dir():
                return Source("folder", folder)
        archive = self.archive_path(data_dir)
        if archive is not None and archive.is_file():
            return Source("archive", archive)
        return None

    def find_local(self, data_dir: Path) -> Source | None:
        return self.find_tree(data_dir)

    def decode(self, source: Source) -> Decoded:
        if source.kind == "folder":
            return self.decode_folder(source.path)
        if source.kind == "archive":
            return self.decode_archive(source.path)
        raise AssertionError(f"{self.name}: cannot decode a {source.kind!r} source")

    def decode_folder(self, root: Path) -> Decoded:
        tree = tree_files(root)
        self.check_classes(list(tree), root)
        empty = [c for c, files in tree.items() if not files]
        if empty:
            raise ValueError(f"class folder(s) without image files in {root}: {empty}")
        total = sum(len(files) for files in tree.values())
        self.log_start(total, root, exact=True)
        progress = Progress(self.name, total, self.progress_every)
        images = np.empty((total, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        labels = np.empty(total, dtype=np.int64)
        all_gray = True
        i = 0
        for label, (cls, files) in enumerate(tree.items()):
            for rel in files:
                images[i], gray = decode_image(root / cls / rel)
                all_gray &= gray
                labels[i] = label
                i += 1
                progress.step()
        return Decoded(images, labels, list(tree), all_gray)

    def archive_member_key(self, member: str) -> tuple[str, tuple[str, ...]] | None:
        """Split an archive member path into ``(prefix, (class, ..., file))``.

        None if the member lies outside the train folders of
        :attr:`archive_prefixes`; absolute paths and paths with ``..`` raise
        ``ValueError``."""
        path = PurePosixPath(member)
        parts = tuple(p for p in path.parts if p != ".")
        if path.is_absolute() or ".." in parts:
            raise ValueError(f"unsafe member path in archive: {member!r}")
        for prefix in self.archive_prefixes:
            rest = parts[len(prefix) :]
            if parts[: len(prefix)] == prefix and len(rest) >= 2:
                return "/".join(prefix), rest
        return None

    def decode_archive(self, archive: Path) -> Decoded:
        """Stream the train images of a ``.tar.gz`` or ``.zip`` tree, decode in
        memory."""
        self.log_start(self.expected_images, archive, exact=False)
        progress = Progress(self.name, self.expected_images, self.progress_every)
        found: list[tuple[str, str, np.ndarray]] = []
        chosen_prefix = None
        all_gray = True
        for path, is_file, read in _archive_members(archive):
            key = self.archive_member_key(path)
            if key is None or not is_file or not is_image_name(key[1][-1]):
                continue
            prefix, (cls, *rel) = key
            chosen_prefix = chosen_prefix or prefix  # the first tree found is used
            if prefix != chosen_prefix or any(p.startswith(".") for p in (cls, *rel)):
                continue
            pixels, gray = decode_image(io.BytesIO(read()))
            all_gray &= gray
            found.append((cls, "/".join(rel), pixels))
            progress.step()
        classes = sorted({cls for cls, _, _ in found})
        self.check_classes(classes, archive / (chosen_prefix or "train"))
        found.sort(key=lambda item: item[:2])
        index = {cls: label for label, cls in enumerate(classes)}
        images = np.stack([img for _, _, img in found])
        labels = np.array([index[cls] for cls, _, _ in found], dtype=np.int64)
        return Decoded(images, labels, classes, all_gray)

    def log_start(self, total: int | None, where: Path, exact: bool) -> None:
        """Say what a long decode does (when :attr:`progress_every` is set)."""
        if not self.progress_every:
            return
        count = f"{total:,} images" if total else ""
        if count and not exact:
            count += " expected"
        log(
            INFO,
            "%s: decoding the train images of %s to 32x32 (%s), once: the arrays "
            "are cached; a progress line follows every %s images",
            *(self.name, where, count or "count unknown", f"{self.progress_every:,}"),
        )
