"""CIFAR-10 and CIFAR-100 (``cifar10``, ``cifar100``).

Lookup order in ``data_dir`` (the first layout present wins):

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
    ``<name>-jpg/train/``, ``<name>/train/`` or ``train/``, read in place
    (:mod:`.images`);
(d) when ``download`` is true, torchvision downloads the official files into
    ``data_dir`` and (a) is used; a failed download (e.g. no network) is reported;
(e) otherwise :class:`~.registry.DatasetNotFoundError` says which folder was
    searched, which layouts were looked for and how to provide one.

Decoding once takes about 10 s for CIFAR-10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageTree
from .registry import (
    DatasetInfo,
    DatasetNotFoundError,
    Decoded,
    Source,
    register,
    torchvision_datasets,
)

__all__ = ["CIFAR10_CLASSES", "CIFAR100_CLASSES", "Cifar"]

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
# fmt: on

# The official label order is alphabetical: a sorted image-folder tree agrees with it.
assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES) and len(CIFAR10_CLASSES) == 10
assert (
    list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES) and len(CIFAR100_CLASSES) == 100
)


class Cifar(ImageTree):
    """A CIFAR dataset: torchvision's official files, or an image tree of them."""

    def __init__(
        self, info: DatasetInfo, tv_class: str, tv_folder: str, classes: tuple[str, ...]
    ) -> None:
        self.info = info
        self.tv_class = tv_class  # attribute of torchvision.datasets
        self.tv_folder = tv_folder  # folder torchvision reads inside its root
        self.classes = classes

    # -- lookup ------------------------------------------------------------------
    def folder_candidates(self, data_dir: Path) -> list[Path]:
        name = self.name
        return [
            data_dir / f"{name}-jpg" / "train",
            data_dir / name / "train",
            data_dir / "train",
        ]

    def archive_path(self, data_dir: Path) -> Path | None:
        return data_dir / f"{self.name}-jpg.tar.gz"

    def find_local(self, data_dir: Path) -> Source | None:
        if (data_dir / self.tv_folder).is_dir():
            return Source("torchvision", data_dir / self.tv_folder)
        return self.find_tree(data_dir)

    def download(self, data_dir: Path) -> None:
        self._torchvision(data_dir, download=True)

    def looked_for(self, data_dir: Path) -> list[str]:
        tree = "<class>/<image files>"
        return [
            f"{self.tv_folder}/  (torchvision's official python-version files)",
            *(
                f"{p.relative_to(data_dir)}/{tree}  (image folder)"
                for p in self.folder_candidates(data_dir)
            ),
            f"{self.name}-jpg.tar.gz  (archive of such a tree, read in place)",
        ]

    def remedy(self, data_dir: Path) -> list[str]:
        name = self.name
        archive_name = name.replace("cifar", "cifar-") + "-python.tar.gz"
        url = f"https://www.cs.toronto.edu/~kriz/{archive_name}"
        examples = ", ".join(self.classes[:3])
        return [
            "  - on a machine with a network, run once with download enabled, or fetch",
            f"    {url} and extract it in {data_dir} (it creates {self.tv_folder}/);",
            "  - or put one image per file in",
            f"    {data_dir}/{name}-jpg/train/<class>/, the folder names being the",
            f"    official class names ({examples}, ...),",
            f"    or that tree packed as {data_dir}/{name}-jpg.tar.gz.",
        ]

    # -- decoding ----------------------------------------------------------------
    def check_classes(self, classes: list[str], where: Path) -> None:
        super().check_classes(classes, where)
        if classes != list(self.classes):
            raise ValueError(
                f"class folders of {where} are not the official {self.name} classes: "
                f"found {classes}, expected {list(self.classes)} (the folder name is "
                "the label)"
            )

    def decode(self, source: Source) -> Decoded:
        if source.kind != "torchvision":
            return super().decode(source)
        folder = source.path
        try:
            ds = self._torchvision(folder.parent, download=False)
        except RuntimeError as err:
            raise DatasetNotFoundError(
                f"{folder} exists but torchvision cannot read it ({err}): the files "
                "are incomplete or their md5 sums differ from the official ones. "
                "Delete the folder to download it again or to use another layout."
            ) from err
        if list(ds.classes) != list(self.classes):
            raise ValueError(
                f"{folder} lists classes {ds.classes}, expected {list(self.classes)}"
            )
        return Decoded(
            np.asarray(ds.data, dtype=np.uint8),
            np.asarray(ds.targets, dtype=np.int64),
            list(ds.classes),
        )

    def _torchvision(self, root: Path, download: bool) -> Any:
        return getattr(torchvision_datasets(), self.tv_class)(
            root=str(root), train=True, download=download
        )


register(
    Cifar(
        DatasetInfo(
            "cifar10", 10, 3, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
        ),
        "CIFAR10",
        "cifar-10-batches-py",
        CIFAR10_CLASSES,
    )
)
register(
    Cifar(
        DatasetInfo(
            "cifar100", 100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        ),
        "CIFAR100",
        "cifar-100-python",
        CIFAR100_CLASSES,
    )
)
