"""The one registry of datasets, and the types every dataset family shares.

Each family module (:mod:`.cifar`, :mod:`.tiny_imagenet`, :mod:`.mnist`,
:mod:`.imagefolder`) defines a :class:`Dataset` subclass and calls :func:`register`
for each of its datasets when it is imported; :mod:`common.datasets` imports them in
a fixed order, so :data:`REGISTRY` lists the names in that order. Everything that
needs the list of datasets (the loader, the run-config schema in
:mod:`common.config`) reads it from here.

A :class:`Dataset` answers, for one dataset: what a model needs to know
(:attr:`Dataset.info`), where a copy of its train split may lie in ``data_dir``
(:meth:`Dataset.find_local`), how to fetch one (:meth:`Dataset.download`), how to
decode one to ``uint8`` 32x32 arrays (:meth:`Dataset.decode`) and what to tell the
user when none is found (:meth:`Dataset.looked_for`, :meth:`Dataset.remedy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "DEFAULT_EMNIST_SPLIT",
    "IMAGE_SIZE",
    "REGISTRY",
    "Dataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Decoded",
    "Source",
    "get",
    "register",
    "torchvision_datasets",
]

#: Every image is resized to IMAGE_SIZE x IMAGE_SIZE.
IMAGE_SIZE = 32
#: The EMNIST split used unless the run config names another (``emnist-split``).
DEFAULT_EMNIST_SPLIT = "byclass"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``mean`` and ``std`` are per channel (``channels`` entries) in [0, 1] pixel units:
    a pixel ``p`` in 0..255 is normalised as ``(p / 255 - mean) / std``. In
    :data:`common.datasets.DATASETS` the ``imagefolder`` entry is a template
    (``num_classes == 0``, 3 channels and mean/std 0.5):
    :func:`common.datasets.load_train_arrays` returns it with the discovered class
    count and channels and the mean/std measured on the data.
    """

    name: str
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DatasetNotFoundError(FileNotFoundError):
    """No usable copy of the dataset was found (and none could be downloaded)."""


@dataclass(frozen=True)
class Source:
    """One copy of a dataset's train split.

    ``kind`` is ``torchvision`` (CIFAR python files), ``folder`` (image tree),
    ``archive`` (``.tar.gz`` or ``.zip`` of an image tree) or ``idx`` (``files`` are
    the images and labels idx files inside the folder ``path``)."""

    kind: str
    path: Path
    files: tuple[Path, ...] = ()


@dataclass
class Decoded:
    """A decoded train split, before it is cached."""

    images: np.ndarray  # uint8 (N, 32, 32, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    all_gray: bool = False  # every decoded image file had a grayscale PIL mode


class Dataset:
    """One dataset of the registry; a family module subclasses it.

    Subclasses set :attr:`info` and implement :meth:`find_local`, :meth:`decode`,
    :meth:`looked_for` and :meth:`remedy` (and :meth:`download` when
    :attr:`downloadable`). The other methods have the defaults of a dataset with
    fixed class count and channels.
    """

    info: DatasetInfo
    #: False: there is nothing to download (the user provides the data).
    downloadable: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """The run-config name (``dataset``)."""
        return self.info.name

    @property
    def cache_stem(self) -> str:
        """Names the cache files: ``<cache_stem>-train-32x32.*``."""
        return self.name

    @property
    def cached_channels(self) -> int | None:
        """The channel count a cache must have; None: whatever its metadata says."""
        return self.info.channels

    def with_options(self, *, emnist_split: str = DEFAULT_EMNIST_SPLIT) -> Dataset:
        """This dataset as configured by the run config (only EMNIST has options)."""
        return self

    def find_local(self, data_dir: Path) -> Source | None:
        """The first layout of the family's lookup order present in ``data_dir``."""
        raise NotImplementedError

    def download(self, data_dir: Path) -> None:
        """Fetch the official files into ``data_dir`` (any exception: it failed)."""
        raise AssertionError(f"{self.name} cannot be downloaded")

    def decode(self, source: Source) -> Decoded:
        """Decode the train split at ``source`` to ``uint8`` 32x32 images."""
        raise NotImplementedError

    def finish(self, decoded: Decoded) -> None:
        """Adjust ``decoded`` (in place) before it is cached."""

    def extra_meta(self, decoded: Decoded) -> dict[str, Any]:
        """Entries added to the cache metadata (after :meth:`finish`)."""
        return {}

    def loaded_info(self, images: np.ndarray, meta: dict[str, Any]) -> DatasetInfo:
        """The :class:`DatasetInfo` of a loaded cache (images and metadata)."""
        return self.info

    def looked_for(self, data_dir: Path) -> list[str]:
        """What :meth:`find_local` looks for, relative to ``data_dir``, in order."""
        raise NotImplementedError

    def remedy(self, data_dir: Path) -> list[str]:
        """Lines of the not-found message saying how to provide the data."""
        raise NotImplementedError


#: Every dataset, by run-config name, in the order the family modules register them.
REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    """Add ``dataset`` to :data:`REGISTRY` under its name (once)."""
    if dataset.name in REGISTRY:
        raise ValueError(f"dataset {dataset.name!r} is registered twice")
    REGISTRY[dataset.name] = dataset
    return dataset


def get(name: str, *, emnist_split: str = DEFAULT_EMNIST_SPLIT) -> Dataset:
    """The registered dataset ``name`` with the given options; ``ValueError`` for an
    unknown name (or an unknown EMNIST split)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name].with_options(emnist_split=emnist_split)


def torchvision_datasets() -> Any:
    """``torchvision.datasets``, imported through :mod:`common.compat`."""
    from common.compat import import_torchvision

    import_torchvision()
    import torchvision.datasets as tv_datasets

    return tv_datasets
