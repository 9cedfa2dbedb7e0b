"""Tiny-ImageNet (``tiny-imagenet``): 200 classes, 100,000 train JPEGs of 64x64.

Lookup order in ``data_dir`` (the first layout present wins):

(a) the official zip extracted: ``<data_dir>/tiny-imagenet-200/train/<wnid>/images/
    *.JPEG``; labels are the indices of the 200 WordNet ids in sorted order, as
    ``torchvision.datasets.ImageFolder`` gives over ``train/`` (grayscale JPEGs are
    converted to RGB, like ImageFolder's loader does);
(b) the official zip itself, ``<data_dir>/tiny-imagenet-200.zip`` (members under
    ``tiny-imagenet-200/train/``), read in place like a CIFAR archive;
(c) when ``download`` is true, torchvision's ``download_url`` fetches that zip from
    http://cs231n.stanford.edu/tiny-imagenet-200.zip (md5-checked) and (b) is used;
(d) otherwise :class:`~.registry.DatasetNotFoundError`.

The tree must have exactly 200 class folders named like WordNet ids (``n`` and 8
digits), otherwise ``ValueError``: a missing class would silently shift every label.
The images are resized 64->32 with PIL's bilinear filter.

The first load decodes 100,000 JPEGs (minutes): it logs what it does, then a
progress line every 10,000 images with the time so far and an estimate of the time
left, then the total time; later loads read the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from .images import ImageTree
from .registry import DatasetInfo, register, torchvision_datasets

__all__ = ["TINY_IMAGENET_URL", "TinyImageNet"]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_FOLDER = "tiny-imagenet-200"
_TINY_ZIP = "tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_CLASSES = 200
_WNID = re.compile(r"n\d{8}")


class TinyImageNet(ImageTree):
    """The official tree (or zip) of Tiny-ImageNet's train split."""

    progress_every = 10_000
    expected_images = 100_000  # 500 per class

    def __init__(self) -> None:
        self.info = DatasetInfo(
            "tiny-imagenet", 200, 3, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
        )

    def folder_candidates(self, data_dir: Path) -> list[Path]:
        return [data_dir / _TINY_FOLDER / "train"]

    def archive_path(self, data_dir: Path) -> Path | None:
        return data_dir / _TINY_ZIP

    @property
    def archive_prefixes(self) -> tuple[tuple[str, ...], ...]:
        return ((_TINY_FOLDER, "train"),)

    def check_classes(self, classes: list[str], where: Path) -> None:
        super().check_classes(classes, where)
        odd = [c for c in classes if not _WNID.fullmatch(c)]
        if odd or len(classes) != _TINY_CLASSES:
            raise ValueError(
                f"{where} must hold the {_TINY_CLASSES} Tiny-ImageNet class folders "
                f"named by WordNet id (n + 8 digits); found {len(classes)} class "
                f"folders" + (f", not WordNet ids: {odd[:5]}" if odd else "")
            )

    def download(self, data_dir: Path) -> None:
        torchvision_datasets()
        from torchvision.datasets.utils import download_url

        download_url(TINY_IMAGENET_URL, str(data_dir), _TINY_ZIP, _TINY_MD5)

    def looked_for(self, data_dir: Path) -> list[str]:
        return [
            f"{_TINY_FOLDER}/train/<wnid>/images/*.JPEG  (the official zip, extracted)",
            f"{_TINY_ZIP}  (the official zip, read in place)",
        ]

    def remedy(self, data_dir: Path) -> list[str]:
        return [
            "  - on a machine with a network, run once with download enabled, or fetch",
            f"    {TINY_IMAGENET_URL} into {data_dir}/ (it is read",
            f"    in place) or extract it there (it creates {_TINY_FOLDER}/train/).",
        ]


register(TinyImageNet())
