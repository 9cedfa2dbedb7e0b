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
``emnist``         62 [*]_  1    (0.5,) / (0.5,)  (as the reference code)
``mnist``          10       1    (0.1307,) / (0.3081,)
``fashion-mnist``  10       1    (0.2860,) / (0.3530,)
``imagefolder``    found    1|3  measured on the data (see :mod:`.imagefolder`)
=================  =======  ===  ==================================================

.. [*] split ``byclass``, the default; ``emnist_split`` (run-config
   ``emnist-split``) selects another of :data:`EMNIST_SPLITS` (:mod:`.mnist`).

Every image whose size is not 32x32 is resized to 32x32 with PIL's bilinear filter
(what ``torchvision.transforms.Resize((32, 32))`` does to a PIL image): Tiny-ImageNet
64->32, (E)MNIST and Fashion-MNIST 28->32.

The package holds one registry of datasets (:mod:`.registry`; :data:`DATASETS` is
its view by name, which :mod:`common.config` validates ``dataset`` against) and one
module per family, whose docstring gives its lookup order in ``data_dir`` (the first
layout present wins; with ``download`` a missing dataset is fetched with torchvision;
otherwise :class:`DatasetNotFoundError` says which folder was searched, which layouts
were looked for and how to provide one): :mod:`.cifar`, :mod:`.mnist` (MNIST,
Fashion-MNIST, EMNIST), :mod:`.tiny_imagenet`, :mod:`.imagefolder`. Image trees and
archives are read by :mod:`.images`; :mod:`.cache` keeps the decoded arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

import numpy as np

# isort: off
# Importing a family registers its datasets: this order is the order of DATASETS.
from . import cifar, tiny_imagenet, mnist, imagefolder  # noqa: F401

# isort: on
from .cache import load_or_build
from .cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from .mnist import (
    EMNIST_BYCLASS_CLASSES,
    EMNIST_CLASSES,
    EMNIST_SPLITS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
)
from .registry import (
    DEFAULT_EMNIST_SPLIT,
    REGISTRY,
    Dataset,
    DatasetInfo,
    DatasetNotFoundError,
    Source,
    get,
)
from .tiny_imagenet import TINY_IMAGENET_URL

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "DEFAULT_EMNIST_SPLIT",
    "EMNIST_BYCLASS_CLASSES",
    "EMNIST_CLASSES",
    "EMNIST_SPLITS",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "TINY_IMAGENET_URL",
    "DatasetInfo",
    "DatasetNotFoundError",
    "dataset_info",
    "load_train_arrays",
    "locate_train_split",
]

#: Every dataset's :class:`DatasetInfo` by run-config name (EMNIST: ``byclass``), in
#: the registry's order; read-only.
DATASETS = MappingProxyType({name: ds.info for name, ds in REGISTRY.items()})


def dataset_info(name: str, *, emnist_split: str = DEFAULT_EMNIST_SPLIT) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (with the EMNIST split), without loading
    anything; ``ValueError`` for an unknown name or split. ``imagefolder`` gives its
    template (``num_classes == 0``: found when loading)."""
    return get(name, emnist_split=emnist_split).info


def load_train_arrays(
    name: str,
    data_dir: str | os.PathLike[str],
    download: bool = True,
    *,
    emnist_split: str = DEFAULT_EMNIST_SPLIT,
) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """Return ``(images, labels, info)`` for the official train split of ``name``.

    ``images``: ``uint8`` ``(N, 32, 32, C)`` with ``C == info.channels``,
    memory-mapped read-only from the cache; ``labels``: ``int64`` ``(N,)``. See the
    family modules for the lookup order and :mod:`.cache` for the cache; errors:
    :class:`DatasetNotFoundError` when nothing is found, ``ValueError`` for an unknown
    name or EMNIST split or a malformed tree or file. ``emnist_split`` is used by
    ``emnist`` only.
    """
    dataset = get(name, emnist_split=emnist_split)
    data_dir = Path(data_dir).expanduser().absolute()
    source = _find_source(dataset, data_dir, download)
    images, labels, meta = load_or_build(dataset, data_dir, source)
    return images, labels, dataset.loaded_info(images, meta)


def locate_train_split(
    name: str,
    data_dir: str | os.PathLike[str],
    download: bool = True,
    *,
    emnist_split: str = DEFAULT_EMNIST_SPLIT,
) -> Path:
    """Where :func:`load_train_arrays` would read ``name`` from, without decoding.

    The same lookup (and, with ``download``, the same download attempt) as loading,
    so a launcher can check the data once before any client starts. Raises
    :class:`DatasetNotFoundError` (its message lists what was looked for and how to
    provide it) or ``ValueError`` for an unknown name.
    """
    dataset = get(name, emnist_split=emnist_split)
    return _find_source(dataset, Path(data_dir).expanduser().absolute(), download).path


def _find_source(dataset: Dataset, data_dir: Path, download: bool) -> Source:
    """Apply the family's lookup order, then download, then give up."""
    source = dataset.find_local(data_dir)
    if source is not None:
        return source
    download_note = (
        "download=False, so no download was tried (downloading needs a network)."
    )
    if not dataset.downloadable:
        download_note = "This dataset cannot be downloaded."
    elif download:
        try:
            dataset.download(data_dir)
        except Exception as err:  # any failure of the network, disk or md5 check
            download_note = (
                f"Downloading with torchvision into {data_dir} failed "
                f"({type(err).__name__}: {err}); this machine may have no network."
            )
        else:
            source = dataset.find_local(data_dir)
            if source is not None:
                return source
            download_note = (
                f"Downloading with torchvision into {data_dir} finished, yet the "
                "files above are still missing."
            )
    raise DatasetNotFoundError(_not_found_message(dataset, data_dir, download_note))


def _not_found_message(dataset: Dataset, data_dir: Path, download_note: str) -> str:
    return "\n".join(
        [
            f"Dataset {dataset.name!r} not found in {data_dir}.",
            "Looked for, in this order:",
            *(f"  - {data_dir}/{item}" for item in dataset.looked_for(data_dir)),
            download_note,
            "To fill it:",
            *dataset.remedy(data_dir),
        ]
    )
