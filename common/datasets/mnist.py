"""The MNIST family, read from torchvision's idx files: ``mnist``, ``fashion-mnist``
and ``emnist`` (any of its six splits, run-config ``emnist-split``).

Lookup order in ``data_dir``:

(a) the official idx files of the train split in ``<data_dir>/MNIST/raw/``,
    ``<data_dir>/FashionMNIST/raw/`` or ``<data_dir>/EMNIST/raw/``:
    ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (MNIST, Fashion-MNIST)
    or ``emnist-<split>-train-images-idx3-ubyte`` and
    ``emnist-<split>-train-labels-idx1-ubyte`` (EMNIST), each either plain or
    gzipped (``.gz``; the plain file wins when both exist). The test-split files are
    not needed. They are parsed here with numpy, not by torchvision, whose reader
    wants the uncompressed files (and, for MNIST, the test split too); the bytes and
    their order are exactly what ``torchvision.datasets.MNIST/EMNIST`` returns, so
    EMNIST keeps torchvision's (transposed) orientation, which is what the reference
    code trains on;
(b) when ``download`` is true, ``torchvision.datasets.MNIST/FashionMNIST/EMNIST(...,
    download=True)`` fetches them into that folder (EMNIST: the whole 535 MB
    ``gzip.zip`` from NIST, from which torchvision extracts every split) and (a) is
    used;
(c) otherwise :class:`~.registry.DatasetNotFoundError`.

Images are resized 28->32 with PIL's bilinear filter (resized, not padded, so the
digit fills the frame as in the reference code's ``Resize(32)``); one channel.

EMNIST splits (:data:`EMNIST_CLASSES`; the labels are torchvision's):

==========  =======  ====================================================
split       classes  labels
==========  =======  ====================================================
byclass     62       digits, upper-case, lower-case letters (the default)
bymerge     47       byclass with the 15 look-alike lower-case letters merged
balanced    47       as bymerge, with the same number of images per class
letters     26       ``a``..``z`` (upper and lower case merged)
digits      10       the digits
mnist       10       the digits (MNIST-sized subset)
==========  =======  ====================================================

One deviation: the files (and torchvision) label ``letters`` 1..26, with a class
``N/A`` for 0 that no image has; here its labels are shifted to 0..25 so that
every class exists and a model has 26 outputs, not 27. All splits use the reference
code's normalisation (0.5, 0.5); decoding byclass's 697,932 images once takes about
20 s (one PIL resize each).
"""

from __future__ import annotations

import gzip
import string
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .images import resize
from .registry import (
    DEFAULT_EMNIST_SPLIT,
    IMAGE_SIZE,
    Dataset,
    DatasetInfo,
    Decoded,
    Source,
    register,
    torchvision_datasets,
)

__all__ = [
    "EMNIST_BYCLASS_CLASSES",
    "EMNIST_CLASSES",
    "EMNIST_SPLITS",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "Emnist",
    "Idx",
]

#: MNIST's labels are the digits.
MNIST_CLASSES: tuple[str, ...] = tuple(string.digits)
#: Fashion-MNIST's labels, in torchvision's (the official) order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    *("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"),
    *("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)
#: EMNIST "byclass" labels: digits, upper-case then lower-case letters (torchvision).
EMNIST_BYCLASS_CLASSES: tuple[str, ...] = tuple(
    string.digits + string.ascii_uppercase + string.ascii_lowercase
)
#: Lower-case letters that bymerge and balanced merge into their upper case.
_MERGED = frozenset("cijklmopsuvwxyz")
#: The classes of each EMNIST split, in label order (torchvision's; letters shifted).
EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "byclass": EMNIST_BYCLASS_CLASSES,
    "bymerge": tuple(c for c in EMNIST_BYCLASS_CLASSES if c not in _MERGED),
    "balanced": tuple(c for c in EMNIST_BYCLASS_CLASSES if c not in _MERGED),
    "letters": tuple(string.ascii_lowercase),
    "digits": MNIST_CLASSES,
    "mnist": MNIST_CLASSES,
}
EMNIST_SPLITS: tuple[str, ...] = tuple(EMNIST_CLASSES)
assert len(EMNIST_BYCLASS_CLASSES) == 62 and len(EMNIST_CLASSES["bymerge"]) == 47
assert DEFAULT_EMNIST_SPLIT in EMNIST_SPLITS

# idx format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type byte (0x08:
# unsigned byte), the number of dimensions, then each dimension as a big-endian uint32,
# then the data in row-major order. torchvision's MNIST reader reads the same bytes.
_IDX_UBYTE = 0x08


def _read_exact(handle: IO[bytes], size: int, path: Path) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"{path} is truncated (idx file shorter than its header says)")
    return data


def _idx_header(handle: IO[bytes], path: Path, ndim: int) -> tuple[int, ...]:
    magic = _read_exact(handle, 4, path)
    if magic[:2] != b"\0\0" or magic[2] != _IDX_UBYTE or magic[3] != ndim:
        raise ValueError(
            f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s) "
            f"(magic number {magic.hex()}, expected 0000080{ndim})"
        )
    return struct.unpack(f">{ndim}I", _read_exact(handle, 4 * ndim, path))


def _open_idx(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx_labels(path: Path) -> np.ndarray:
    with _open_idx(path) as handle:
        (n,) = _idx_header(handle, path, 1)
        return np.frombuffer(_read_exact(handle, n, path), np.uint8).astype(np.int64)


def _read_idx_images(path: Path, chunk: int = 8192) -> np.ndarray:
    """``uint8`` ``(N, 32, 32, 1)``: each image of an idx3 file resized with PIL's
    bilinear filter (mode ``L``) when it is not 32x32; read in chunks, so the raw
    file is never held in memory whole (gzipped or not)."""
    with _open_idx(path) as handle:
        n, rows, cols = _idx_header(handle, path, 3)
        out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            raw = np.frombuffer(
                _read_exact(handle, count * rows * cols, path), np.uint8
            )
            for i, img in enumerate(raw.reshape(count, rows, cols)):
                out[start + i, :, :, 0] = resize(Image.fromarray(img))
    return out


class Idx(Dataset):
    """A train split kept by torchvision as two idx files in ``<tv_class>/raw/``."""

    #: Subtracted from every label read (EMNIST letters: 1).
    label_offset = 0

    def __init__(
        self,
        info: DatasetInfo,
        tv_class: str,
        prefix: str,
        classes: tuple[str, ...],
        origin: str,
        tv_kwargs: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.info = info
        self.tv_class = tv_class  # attribute of torchvision.datasets; root folder
        self.prefix = prefix  # <prefix>-images-idx3-ubyte, <prefix>-labels-idx1-ubyte
        self.classes = classes
        self.origin = origin  # where the files come from, for the not-found message
        self.tv_kwargs = tv_kwargs

    def folder(self, data_dir: Path) -> Path:
        return data_dir / self.tv_class / "raw"

    @property
    def file_names(self) -> tuple[str, str]:
        return f"{self.prefix}-images-idx3-ubyte", f"{self.prefix}-labels-idx1-ubyte"

    def find_local(self, data_dir: Path) -> Source | None:
        """The images and labels files (plain preferred over ``.gz``), if both exist."""
        folder = self.folder(data_dir)
        found = []
        for file_name in self.file_names:
            plain, gz = folder / file_name, folder / f"{file_name}.gz"
            if plain.is_file():
                found.append(plain)
            elif gz.is_file():
                found.append(gz)
            else:
                return None
        return Source("idx", folder, (found[0], found[1]))

    def download(self, data_dir: Path) -> None:
        getattr(torchvision_datasets(), self.tv_class)(
            root=str(data_dir), train=True, download=True, **dict(self.tv_kwargs)
        )

    def decode(self, source: Source) -> Decoded:
        images_file, labels_file = source.files
        name, offset, count = self.name, self.label_offset, len(self.classes)
        try:
            labels = _read_idx_labels(labels_file) - offset
            images = _read_idx_images(images_file)
        except (OSError, EOFError, zlib.error) as err:  # e.g. a corrupt .gz
            raise ValueError(f"cannot read the idx files of {name}: {err}") from err
        if len(images) != len(labels):
            raise ValueError(
                f"{images_file} holds {len(images)} images but {labels_file} holds "
                f"{len(labels)} labels"
            )
        if len(labels) and (labels.max() >= count or labels.min() < 0):
            bad = labels.max() if labels.max() >= count else labels.min()
            raise ValueError(
                f"{labels_file} has label {bad + offset}, but {name} has {count} "
                "classes"
                + (f" (labelled {offset}..{count - 1 + offset})" if offset else "")
            )
        return Decoded(images, labels, list(self.classes), all_gray=True)

    def looked_for(self, data_dir: Path) -> list[str]:
        raw = self.folder(data_dir).relative_to(data_dir)
        return [
            f"{raw}/{f}  or  {raw}/{f}.gz  (official idx file)" for f in self.file_names
        ]

    def remedy(self, data_dir: Path) -> list[str]:
        images, labels = (f"{f}.gz" for f in self.file_names)
        return [
            "  - on a machine with a network, run once with download enabled "
            f"(torchvision.datasets.{self.tv_class} fetches them),",
            f"  - or copy {images} and {labels} from",
            f"    {self.origin}",
            f"    into {self.folder(data_dir)}/ (gzipped or not; the test split is not "
            "needed).",
        ]


class Emnist(Idx):
    """EMNIST, one split (:data:`EMNIST_SPLITS`; the registry holds ``byclass``)."""

    def __init__(self, split: str = DEFAULT_EMNIST_SPLIT) -> None:
        if split not in EMNIST_CLASSES:
            raise ValueError(
                f"unknown EMNIST split {split!r}; choose one of "
                + ", ".join(EMNIST_SPLITS)
            )
        classes = EMNIST_CLASSES[split]
        super().__init__(
            DatasetInfo("emnist", len(classes), 1, (0.5,), (0.5,)),
            "EMNIST",
            f"emnist-{split}-train",
            classes,
            "the gzip/ folder of https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
            (("split", split),),
        )
        self.split = split
        self.label_offset = 1 if split == "letters" else 0

    @property
    def cache_stem(self) -> str:
        # byclass keeps the name it was cached under before splits were selectable
        return "emnist" if self.split == "byclass" else f"emnist-{self.split}"

    def with_options(self, *, emnist_split: str = DEFAULT_EMNIST_SPLIT) -> Dataset:
        return self if emnist_split == self.split else Emnist(emnist_split)


register(Emnist())
register(
    Idx(
        DatasetInfo("mnist", 10, 1, (0.1307,), (0.3081,)),
        "MNIST",
        "train",
        MNIST_CLASSES,
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/"
        "exdb/mnist/)",
    )
)
register(
    Idx(
        DatasetInfo("fashion-mnist", 10, 1, (0.2860,), (0.3530,)),
        "FashionMNIST",
        "train",
        FASHION_MNIST_CLASSES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    )
)
