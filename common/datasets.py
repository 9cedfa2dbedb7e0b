"""Load the official TRAIN split of a dataset as ``uint8`` arrays, decoded and cached.

Only the train split is ever read: the paper partitions the official train split among
the clients and splits each client's share 75/25 into local train and test sets.

:func:`load_train_arrays` returns ``(images, labels, info)``: ``images`` is a read-only
``uint8`` array of shape ``(N, 32, 32, C)`` memory-mapped from a cache file (indexing
it reads only the rows asked for), ``labels`` is ``int64`` of shape ``(N,)`` and
``info`` is the :class:`DatasetInfo` (class count, channels ``C``, normalisation).

=================  =======  ===  ==================================================
name               classes  C    normalisation mean / std (per channel)
=================  =======  ===  ==================================================
``cifar10``        10       3    (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010)
``cifar100``       100      3    (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762)
``tiny-imagenet``  200      3    (0.4802, 0.4481, 0.3975) / (0.2770, 0.2691, 0.2821)
``emnist``         62       1    (0.5,) / (0.5,)  (as the reference code)
``mnist``          10       1    (0.1307,) / (0.3081,)
``fashion-mnist``  10       1    (0.2860,) / (0.3530,)
``imagefolder``    found    1|3  measured on the data (see below)
=================  =======  ===  ==================================================

Every image whose size is not 32x32 is resized to 32x32 with PIL's bilinear filter
(what ``torchvision.transforms.Resize((32, 32))`` does to a PIL image): Tiny-ImageNet
64->32, (E)MNIST and Fashion-MNIST 28->32 (resized, not padded, so the digit fills
the frame as in the reference code's ``Resize(32)``).

Lookup order in ``data_dir`` (the first layout present wins)
-------------------------------------------------------------
For ``cifar10`` / ``cifar100``:

(a) torchvision's official files ``<data_dir>/cifar-10-batches-py/`` or
    ``<data_dir>/cifar-100-python/`` (the "python version" archives from
    https://www.cs.toronto.edu/~kriz/cifar.html, extracted), read with
    ``torchvision.datasets.CIFAR10/100(download=False)``, which checks their md5 sums;
(b) an image-folder tree ``<data_dir>/<name>-jpg/train/<class>/*``,
    ``<data_dir>/<name>/train/<class>/*`` or ``<data_dir>/train/<class>/*``; the label
    of an image is the index of its class folder in sorted order, and the folder names
    must be the official class names (whose official label order is alphabetical, so
    sorted order is the official order);
(c) an archive ``<data_dir>/<name>-jpg.tar.gz`` holding such a tree under
    ``<name>-jpg/train/``, ``<name>/train/`` or ``train/``. It is read in place: the
    members are streamed and decoded in memory, so nothing but the cache is written
    (no 50,000 small files, and no member path ever reaches the file system);
(d) when ``download`` is true, torchvision downloads the official files into
    ``data_dir`` and (a) is used; a failed download (e.g. no network) is reported;
(e) otherwise :class:`DatasetNotFoundError` says which folder was searched, which
    layouts were looked for and how to provide one.

For ``mnist`` / ``fashion-mnist`` / ``emnist`` (torchvision's layout):

(a) the official idx files of the train split in ``<data_dir>/MNIST/raw/``,
    ``<data_dir>/FashionMNIST/raw/`` or ``<data_dir>/EMNIST/raw/``:
    ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (MNIST, Fashion-MNIST)
    or ``emnist-byclass-train-images-idx3-ubyte`` and
    ``emnist-byclass-train-labels-idx1-ubyte`` (EMNIST, split "byclass"), each either
    plain or gzipped (``.gz``; the plain file wins when both exist). The test-split
    files are not needed. They are parsed here with numpy, not by torchvision, whose
    reader wants the uncompressed files (and, for MNIST, the test split too); the
    bytes and their order are exactly what ``torchvision.datasets.MNIST/EMNIST``
    returns, so EMNIST keeps torchvision's (transposed) orientation, which is what the
    reference code trains on;
(b) when ``download`` is true, ``torchvision.datasets.MNIST/FashionMNIST/EMNIST(...,
    download=True)`` fetches them into that folder (EMNIST: the whole 535 MB
    ``gzip.zip`` from NIST, from which torchvision extracts every split) and (a) is
    used;
(c) otherwise :class:`DatasetNotFoundError`.

For ``tiny-imagenet``:

(a) the official zip extracted: ``<data_dir>/tiny-imagenet-200/train/<wnid>/images/
    *.JPEG``; labels are the indices of the 200 WordNet ids in sorted order, as
    ``torchvision.datasets.ImageFolder`` gives over ``train/`` (grayscale JPEGs are
    converted to RGB, like ImageFolder's loader does);
(b) the official zip itself, ``<data_dir>/tiny-imagenet-200.zip`` (members under
    ``tiny-imagenet-200/train/``), read in place like a CIFAR archive;
(c) when ``download`` is true, torchvision's ``download_url`` fetches that zip from
    http://cs231n.stanford.edu/tiny-imagenet-200.zip (md5-checked) and (b) is used;
(d) otherwise :class:`DatasetNotFoundError`.
The tree must have exactly 200 class folders named like WordNet ids (``n`` and 8
digits), otherwise ``ValueError``: a missing class would silently shift every label.

For ``imagefolder``: ``<data_dir>/train/<class>/**/<image>`` with images of any size
and PIL mode, resized to 32x32 with PIL's bilinear filter; classes are the sorted
folder names. Channels: if EVERY image has a grayscale PIL mode (``1``, ``L`` or
``LA``; the alpha of ``LA`` is dropped) the dataset keeps 1 channel; otherwise all
images are converted to RGB (3 channels; an alpha channel is dropped, a grayscale
image gets its value in all three channels). Its normalisation is not a published
constant: the per-channel mean and (population) standard deviation of all pixels of
the decoded train split, in [0, 1] units, computed once and cached.

Image files are those with a common image suffix (``.jpg .jpeg .png .bmp .gif .tif
.tiff .webp .ppm .pgm``, any case); hidden files are skipped; inside a class folder
images are found recursively (Tiny-ImageNet keeps them in ``<class>/images/``) and
ordered by relative path, so a tree and its archive give identical arrays.

Cache
-----
Decoded arrays are written to ``<data_dir>/.mhpfedhn-cache/`` when ``data_dir`` is
writable (a folder without any owner write bit counts as read-only even for root),
otherwise to ``$XDG_CACHE_HOME/mh-pfedhn/<sha1 of the absolute source path>/``
(default ``~/.cache/mh-pfedhn/...``): ``<name>-train-32x32.images.npy``,
``<name>-train-32x32.labels.npy`` and ``<name>-train-32x32.json``, the metadata,
written last. The metadata records a fingerprint of the source (file sizes and
modification times, or the list of image files of a tree); a cache whose fingerprint
no longer matches is rebuilt. Every file is written to a temporary name and moved into
place with ``os.replace``; building happens under an exclusive ``fcntl.flock`` on
``<name>-train-32x32.lock``, so processes that start together decode only once (the
others wait, then read the cache). POSIX only. Decoding once takes about 10 s for
CIFAR-10 and about 20 s for EMNIST's 697,932 images (one PIL resize each).
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import re
import stat
import string
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "EMNIST_BYCLASS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "TINY_IMAGENET_URL",
    "DatasetInfo",
    "DatasetNotFoundError",
    "load_train_arrays",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
CACHE_DIRNAME = ".mhpfedhn-cache"
CACHE_FORMAT = 1
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
#: PIL modes counted as grayscale by ``imagefolder`` (1 channel if all images are).
GRAY_MODES = frozenset({"1", "L", "LA"})


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``mean`` and ``std`` are per channel (``channels`` entries) in [0, 1] pixel units:
    a pixel ``p`` in 0..255 is normalised as ``(p / 255 - mean) / std``. In
    :data:`DATASETS` the ``imagefolder`` entry is a template (``num_classes == 0``,
    3 channels and mean/std 0.5): :func:`load_train_arrays` returns it with the
    discovered class count and channels and the mean/std measured on the data.
    """

    name: str
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "tiny-imagenet": DatasetInfo(
        "tiny-imagenet", 200, 3, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
    ),
    "emnist": DatasetInfo("emnist", 62, 1, (0.5,), (0.5,)),
    "mnist": DatasetInfo("mnist", 10, 1, (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, (0.2860,), (0.3530,)),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# fmt: off
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can",
    "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud",
    "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo",
    "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

#: MNIST's labels are the digits.
MNIST_CLASSES: tuple[str, ...] = tuple(string.digits)
#: Fashion-MNIST's labels, in torchvision's (the official) order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: EMNIST "byclass" labels: digits, upper-case then lower-case letters (torchvision).
EMNIST_BYCLASS_CLASSES: tuple[str, ...] = tuple(
    string.digits + string.ascii_uppercase + string.ascii_lowercase
)
# fmt: on

# The official label order is alphabetical: a sorted image-folder tree agrees with it.
assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES) and len(CIFAR10_CLASSES) == 10
assert (
    list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES) and len(CIFAR100_CLASSES) == 100
)
assert len(EMNIST_BYCLASS_CLASSES) == 62


@dataclass(frozen=True)
class _CifarSpec:
    """Where the official files of a CIFAR dataset live and what they contain."""

    tv_class: str  # attribute of torchvision.datasets
    tv_folder: str  # folder torchvision reads inside its root
    classes: tuple[str, ...]


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec("CIFAR10", "cifar-10-batches-py", CIFAR10_CLASSES),
    "cifar100": _CifarSpec("CIFAR100", "cifar-100-python", CIFAR100_CLASSES),
}


@dataclass(frozen=True)
class _IdxSpec:
    """Where torchvision keeps the idx files of an MNIST-like train split."""

    tv_class: str  # attribute of torchvision.datasets; also the folder in its root
    prefix: str  # file names are <prefix>-images-idx3-ubyte, <prefix>-labels-idx1-ubyte
    classes: tuple[str, ...]
    origin: str  # where the files come from, for the not-found message
    tv_kwargs: tuple[tuple[str, str], ...] = ()

    def folder(self, data_dir: Path) -> Path:
        return data_dir / self.tv_class / "raw"

    @property
    def file_names(self) -> tuple[str, str]:
        return f"{self.prefix}-images-idx3-ubyte", f"{self.prefix}-labels-idx1-ubyte"


_IDX: dict[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        "MNIST",
        "train",
        MNIST_CLASSES,
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/"
        "exdb/mnist/)",
    ),
    "fashion-mnist": _IdxSpec(
        "FashionMNIST",
        "train",
        FASHION_MNIST_CLASSES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "emnist": _IdxSpec(
        "EMNIST",
        "emnist-byclass-train",
        EMNIST_BYCLASS_CLASSES,
        "the gzip/ folder of https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
        (("split", "byclass"),),
    ),
}

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_FOLDER = "tiny-imagenet-200"
_TINY_ZIP = "tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_CLASSES = 200
_WNID = re.compile(r"n\d{8}")


class DatasetNotFoundError(FileNotFoundError):
    """No usable copy of the dataset was found (and none could be downloaded)."""


@dataclass(frozen=True)
class _Source:
    """One copy of a dataset's train split.

    ``kind`` is ``torchvision`` (CIFAR python files), ``folder`` (image tree),
    ``archive`` (``.tar.gz`` or ``.zip`` of an image tree) or ``idx`` (``files`` are
    the images and labels idx files inside the folder ``path``)."""

    kind: str
    path: Path
    files: tuple[Path, ...] = ()


@dataclass
class _Decoded:
    images: np.ndarray  # uint8 (N, 32, 32, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    all_gray: bool = False  # every decoded image file had a grayscale PIL mode


# --------------------------------------------------------------------------- public


def load_train_arrays(
    name: str, data_dir: str | os.PathLike[str], download: bool = True
) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """Return ``(images, labels, info)`` for the official train split of ``name``.

    ``images``: ``uint8`` ``(N, 32, 32, C)`` with ``C == info.channels``,
    memory-mapped read-only from the cache; ``labels``: ``int64`` ``(N,)``. See the
    module docstring for the lookup order, the cache and the errors
    (:class:`DatasetNotFoundError` when nothing is found, ``ValueError`` for a
    malformed tree or file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    data_dir = Path(data_dir).expanduser().absolute()
    source = _find_source(name, data_dir, download)
    images, labels, meta = _load_or_build(name, data_dir, source)
    info = DATASETS[name]
    if name == "imagefolder":
        info = dataclasses.replace(
            info,
            num_classes=len(meta["classes"]),
            channels=int(images.shape[-1]),
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
        )
    return images, labels, info


# ----------------------------------------------------------------------- lookup


def _folder_candidates(name: str, data_dir: Path) -> list[Path]:
    if name == "imagefolder":
        return [data_dir / "train"]
    if name == "tiny-imagenet":
        return [data_dir / _TINY_FOLDER / "train"]
    if name in _IDX:
        return []
    return [
        data_dir / f"{name}-jpg" / "train",
        data_dir / name / "train",
        data_dir / "train",
    ]


def _archive_path(name: str, data_dir: Path) -> Path | None:
    if name == "tiny-imagenet":
        return data_dir / _TINY_ZIP
    return data_dir / f"{name}-jpg.tar.gz" if name in _CIFAR else None


def _archive_prefixes(name: str) -> tuple[tuple[str, ...], ...]:
    """The folders of an archive that may hold the train tree, by preference."""
    if name == "tiny-imagenet":
        return ((_TINY_FOLDER, "train"),)
    return ((f"{name}-jpg", "train"), (name, "train"), ("train",))


def _idx_files(spec: _IdxSpec, data_dir: Path) -> tuple[Path, Path] | None:
    """The images and labels files of ``spec`` (plain preferred over ``.gz``)."""
    folder = spec.folder(data_dir)
    found = []
    for file_name in spec.file_names:
        plain, gz = folder / file_name, folder / f"{file_name}.gz"
        if plain.is_file():
            found.append(plain)
        elif gz.is_file():
            found.append(gz)
        else:
            return None
    return found[0], found[1]


def _find_local(name: str, data_dir: Path) -> _Source | None:
    """The first layout of the module docstring present in ``data_dir``, if any."""
    spec = _CIFAR.get(name)
    if spec is not None and (data_dir / spec.tv_folder).is_dir():
        return _Source("torchvision", data_dir / spec.tv_folder)
    idx = _IDX.get(name)
    if idx is not None:
        files = _idx_files(idx, data_dir)
        return None if files is None else _Source("idx", idx.folder(data_dir), files)
    for folder in _folder_candidates(name, data_dir):
        if folder.is_dir():
            return _Source("folder", folder)
    archive = _archive_path(name, data_dir)
    if archive is not None and archive.is_file():
        return _Source("archive", archive)
    return None


def _torchvision_datasets() -> Any:
    from common.compat import import_torchvision

    import_torchvision()
    import torchvision.datasets as tv_datasets

    return tv_datasets


def _download(name: str, data_dir: Path) -> None:
    """Fetch the official files of ``name`` into ``data_dir`` with torchvision."""
    tv_datasets = _torchvision_datasets()
    if name in _CIFAR:
        _torchvision_cifar(_CIFAR[name], data_dir, download=True)
    elif name in _IDX:
        spec = _IDX[name]
        getattr(tv_datasets, spec.tv_class)(
            root=str(data_dir), train=True, download=True, **dict(spec.tv_kwargs)
        )
    elif name == "tiny-imagenet":
        from torchvision.datasets.utils import download_url

        download_url(TINY_IMAGENET_URL, str(data_dir), _TINY_ZIP, _TINY_MD5)
    else:
        raise AssertionError(f"{name} cannot be downloaded")


def _find_source(name: str, data_dir: Path, download: bool) -> _Source:
    """Apply the lookup order of the module docstring."""
    source = _find_local(name, data_dir)
    if source is not None:
        return source
    download_note = (
        "download=False, so no download was tried (downloading needs a network)."
    )
    if name == "imagefolder":
        download_note = "This dataset cannot be downloaded."
    elif download:
        try:
            _download(name, data_dir)
        except Exception as err:  # any failure of the network, disk or md5 check
            download_note = (
                f"Downloading with torchvision into {data_dir} failed "
                f"({type(err).__name__}: {err}); this machine may have no network."
            )
        else:
            source = _find_local(name, data_dir)
            if source is not None:
                return source
            download_note = (
                f"Downloading with torchvision into {data_dir} finished, yet the "
                "files above are still missing."
            )
    raise DatasetNotFoundError(_not_found_message(name, data_dir, download_note))


def _not_found_message(name: str, data_dir: Path, download_note: str) -> str:
    tree = "<class>/<image files>"
    looked_for = []
    spec = _CIFAR.get(name)
    idx = _IDX.get(name)
    if spec is not None:
        looked_for.append(
            f"{spec.tv_folder}/  (torchvision's official python-version files)"
        )
    if idx is not None:
        raw = idx.folder(data_dir).relative_to(data_dir)
        looked_for += [
            f"{raw}/{f}  or  {raw}/{f}.gz  (official idx file)" for f in idx.file_names
        ]
    if name == "tiny-imagenet":
        looked_for.append(
            f"{_TINY_FOLDER}/train/<wnid>/images/*.JPEG  (the official zip, extracted)"
        )
    else:
        looked_for += [
            f"{p.relative_to(data_dir)}/{tree}  (image folder)"
            for p in _folder_candidates(name, data_dir)
        ]
    archive = _archive_path(name, data_dir)
    if archive is not None:
        what = (
            "the official zip" if name == "tiny-imagenet" else "archive of such a tree"
        )
        looked_for.append(f"{archive.name}  ({what}, read in place)")
    lines = [
        f"Dataset {name!r} not found in {data_dir}.",
        "Looked for, in this order:",
        *(f"  - {data_dir}/{item}" for item in looked_for),
        download_note,
        "To fill it:",
    ]
    if spec is not None:
        archive_name = name.replace("cifar", "cifar-") + "-python.tar.gz"
        url = f"https://www.cs.toronto.edu/~kriz/{archive_name}"
        examples = ", ".join(spec.classes[:3])
        lines += [
            "  - on a machine with a network, run once with download enabled, or fetch",
            f"    {url} and extract it in {data_dir} (it creates {spec.tv_folder}/);",
            "  - or put one image per file in",
            f"    {data_dir}/{name}-jpg/train/<class>/, the folder names being the",
            f"    official class names ({examples}, ...),",
            f"    or that tree packed as {data_dir}/{name}-jpg.tar.gz.",
        ]
    elif idx is not None:
        images, labels = (f"{f}.gz" for f in idx.file_names)
        lines += [
            "  - on a machine with a network, run once with download enabled "
            f"(torchvision.datasets.{idx.tv_class} fetches them),",
            f"  - or copy {images} and {labels} from",
            f"    {idx.origin}",
            f"    into {idx.folder(data_dir)}/ (gzipped or not; the test split is not "
            "needed).",
        ]
    elif name == "tiny-imagenet":
        lines += [
            "  - on a machine with a network, run once with download enabled, or fetch",
            f"    {TINY_IMAGENET_URL} into {data_dir}/ (it is read",
            f"    in place) or extract it there (it creates {_TINY_FOLDER}/train/).",
        ]
    else:
        lines.append(
            f"  - put the images in {data_dir}/train/<class name>/, one folder per "
            "class (any size and mode; they are converted to 32x32, 1 channel if all "
            "are grayscale, else RGB)."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- decoding


def _torchvision_cifar(spec: _CifarSpec, root: Path, download: bool) -> Any:
    return getattr(_torchvision_datasets(), spec.tv_class)(
        root=str(root), train=True, download=download
    )


def _resize(img: Image.Image) -> np.ndarray:
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _decode_image(fp: str | os.PathLike[str] | IO[bytes]) -> tuple[np.ndarray, bool]:
    """Decode one image file to ``uint8`` ``(32, 32, 3)`` and say whether it is
    grayscale (PIL mode in :data:`GRAY_MODES`).

    Colour images: PIL ``convert("RGB")``, then a bilinear resize to 32x32 when the
    image has another size. Grayscale ones are converted to ``L``, resized, and their
    one channel is repeated three times: the same pixels as the RGB path gives them.
    """
    with Image.open(fp) as img:
        gray = img.mode in GRAY_MODES
        mode = "L" if gray else "RGB"
        pixels = _resize(img if img.mode == mode else img.convert(mode))
    if gray:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels, gray


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _check_classes(name: str, classes: list[str], where: Path) -> None:
    """Raise ``ValueError`` unless the class folders are usable for ``name``."""
    if not classes:
        raise ValueError(
            f"{where} holds no class folders with images (expected <class>/<images>)"
        )
    spec = _CIFAR.get(name)
    if spec is not None and classes != list(spec.classes):
        raise ValueError(
            f"class folders of {where} are not the official {name} classes: found "
            f"{classes}, expected {list(spec.classes)} (the folder name is the label)"
        )
    if name == "tiny-imagenet":
        odd = [c for c in classes if not _WNID.fullmatch(c)]
        if odd or len(classes) != _TINY_CLASSES:
            raise ValueError(
                f"{where} must hold the {_TINY_CLASSES} Tiny-ImageNet class folders "
                f"named by WordNet id (n + 8 digits); found {len(classes)} class "
                f"folders" + (f", not WordNet ids: {odd[:5]}" if odd else "")
            )


def _tree_files(root: Path) -> dict[str, list[str]]:
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
            files += [(rel / f).as_posix() for f in filenames if _is_image_name(f)]
        tree[class_dir.name] = sorted(files)
    return tree


def _decode_folder(name: str, root: Path) -> _Decoded:
    tree = _tree_files(root)
    _check_classes(name, list(tree), root)
    empty = [c for c, files in tree.items() if not files]
    if empty:
        raise ValueError(f"class folder(s) without image files in {root}: {empty}")
    total = sum(len(files) for files in tree.values())
    images = np.empty((total, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    all_gray = True
    i = 0
    for label, (cls, files) in enumerate(tree.items()):
        for rel in files:
            images[i], gray = _decode_image(root / cls / rel)
            all_gray &= gray
            labels[i] = label
            i += 1
    return _Decoded(images, labels, list(tree), all_gray)


def _archive_member_key(name: str, member: str) -> tuple[str, tuple[str, ...]] | None:
    """Split an archive member path into ``(prefix, (class, ..., file))``.

    None if the member lies outside the train folders of :func:`_archive_prefixes`;
    absolute paths and paths with ``..`` raise ``ValueError``."""
    path = PurePosixPath(member)
    parts = tuple(p for p in path.parts if p != ".")
    if path.is_absolute() or ".." in parts:
        raise ValueError(f"unsafe member path in archive: {member!r}")
    for prefix in _archive_prefixes(name):
        rest = parts[len(prefix) :]
        if parts[: len(prefix)] == prefix and len(rest) >= 2:
            return "/".join(prefix), rest
    return None


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


def _decode_archive(name: str, archive: Path) -> _Decoded:
    """Stream the train images of a ``.tar.gz`` or ``.zip`` tree, decode in memory."""
    found: list[tuple[str, str, np.ndarray]] = []
    chosen_prefix = None
    all_gray = True
    for path, is_file, read in _archive_members(archive):
        key = _archive_member_key(name, path)
        if key is None or not is_file or not _is_image_name(key[1][-1]):
            continue
        prefix, (cls, *rel) = key
        chosen_prefix = chosen_prefix or prefix  # the first tree found is the one used
        if prefix != chosen_prefix or any(p.startswith(".") for p in (cls, *rel)):
            continue
        pixels, gray = _decode_image(io.BytesIO(read()))
        all_gray &= gray
        found.append((cls, "/".join(rel), pixels))
    classes = sorted({cls for cls, _, _ in found})
    _check_classes(name, classes, archive / (chosen_prefix or "train"))
    found.sort(key=lambda item: item[:2])
    index = {cls: label for label, cls in enumerate(classes)}
    images = np.stack([img for _, _, img in found])
    labels = np.array([index[cls] for cls, _, _ in found], dtype=np.int64)
    return _Decoded(images, labels, classes, all_gray)


def _decode_torchvision(name: str, folder: Path) -> _Decoded:
    spec = _CIFAR[name]
    try:
        ds = _torchvision_cifar(spec, folder.parent, download=False)
    except RuntimeError as err:
        raise DatasetNotFoundError(
            f"{folder} exists but torchvision cannot read it ({err}): the files are "
            "incomplete or their md5 sums differ from the official ones. Delete the "
            "folder to download it again or to use another layout."
        ) from err
    if list(ds.classes) != list(spec.classes):
        raise ValueError(
            f"{folder} lists classes {ds.classes}, expected {list(spec.classes)}"
        )
    return _Decoded(
        np.asarray(ds.data, dtype=np.uint8),
        np.asarray(ds.targets, dtype=np.int64),
        list(ds.classes),
    )


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
                out[start + i, :, :, 0] = _resize(Image.fromarray(img))
    return out


def _decode_idx(name: str, source: _Source) -> _Decoded:
    spec = _IDX[name]
    images_file, labels_file = source.files
    try:
        labels = _read_idx_labels(labels_file)
        images = _read_idx_images(images_file)
    except (OSError, EOFError, zlib.error) as err:  # e.g. a corrupt .gz
        raise ValueError(f"cannot read the idx files of {name}: {err}") from err
    if len(images) != len(labels):
        raise ValueError(
            f"{images_file} holds {len(images)} images but {labels_file} holds "
            f"{len(labels)} labels"
        )
    if len(labels) and labels.max() >= len(spec.classes):
        raise ValueError(
            f"{labels_file} has label {labels.max()}, but {name} has "
            f"{len(spec.classes)} classes"
        )
    return _Decoded(images, labels, list(spec.classes), all_gray=True)


def _decode(name: str, source: _Source) -> _Decoded:
    if source.kind == "idx":
        return _decode_idx(name, source)
    decoders: dict[str, Callable[[str, Path], _Decoded]] = {
        "torchvision": _decode_torchvision,
        "folder": _decode_folder,
        "archive": _decode_archive,
    }
    return decoders[source.kind](name, source.path)


def _channel_stats(
    images: np.ndarray, chunk: int = 4096
) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std over all pixels, in [0, 1] units (exact
    integer sums of ``p`` and ``p**2`` accumulated in chunks)."""
    channels = images.shape[-1]
    total = np.zeros(channels, dtype=np.float64)
    total_sq = np.zeros(channels, dtype=np.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels).astype(np.int64)
        total += block.sum(axis=0)
        total_sq += (block * block).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return (mean / 255).round(6).tolist(), (std / 255).round(6).tolist()


# ------------------------------------------------------------------------- cache


def _fingerprint(source: _Source) -> dict[str, Any]:
    """What must not change for a cache built from ``source`` to stay valid."""
    path = source.path.resolve()
    fp: dict[str, Any] = {"kind": source.kind, "path": str(path)}
    if source.kind == "folder":
        listing = "\n".join(
            f"{cls}/{f}" for cls, files in _tree_files(path).items() for f in files
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


def _cache_dir(data_dir: Path, source: _Source) -> Path:
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
    def at(cls, cache_dir: Path, name: str) -> _CacheFiles:
        stem = f"{name}-train-{IMAGE_SIZE}x{IMAGE_SIZE}"
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

    def write(self, decoded: _Decoded, meta: dict[str, Any]) -> None:
        _atomic_write(
            self.images, lambda f: np.save(f, np.ascontiguousarray(decoded.images))
        )
        _atomic_write(self.labels, lambda f: np.save(f, decoded.labels))
        _atomic_write(self.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _load_or_build(
    name: str, data_dir: Path, source: _Source
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read the cache of ``source``, building it (once, under a lock) if absent."""
    fingerprint = _fingerprint(source)
    files = _CacheFiles.at(_cache_dir(data_dir, source), name)
    channels = None if name == "imagefolder" else DATASETS[name].channels
    cached = files.read(fingerprint, channels)
    if cached is not None:
        return cached
    with _exclusive_lock(files.lock):
        # another process may have built it meanwhile
        cached = files.read(fingerprint, channels)
        if cached is not None:
            return cached
        start = time.perf_counter()
        decoded = _decode(name, source)
        if name == "imagefolder" and decoded.all_gray:
            decoded.images = np.ascontiguousarray(decoded.images[..., :1])
        seconds = time.perf_counter() - start
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "dataset": name,
            "source": fingerprint,
            "num_samples": len(decoded.labels),
            "channels": int(decoded.images.shape[-1]),
            "classes": decoded.classes,
            "decode_seconds": round(seconds, 3),
        }
        if name == "imagefolder":
            meta["mean"], meta["std"] = _channel_stats(decoded.images)
        files.write(decoded, meta)
        log.info(
            "decoded %d %s images from %s in %.1f s; cached in %s",
            *(len(decoded.labels), name, source.path, seconds, files.images.parent),
        )
    cached = files.read(fingerprint, channels)
    if cached is None:
        raise RuntimeError(f"cache {files.meta} unreadable right after writing it")
    return cached
