"""Any image-folder dataset (``imagefolder``): classes and channels found on disk.

``<data_dir>/train/<class>/**/<image>`` with images of any size and PIL mode,
resized to 32x32 with PIL's bilinear filter; classes are the sorted folder names.
Channels: if EVERY image has a grayscale PIL mode (``1``, ``L`` or ``LA``; the
alpha of ``LA`` is dropped) the dataset keeps 1 channel; otherwise all images are
converted to RGB (3 channels; an alpha channel is dropped, a grayscale image gets
its value in all three channels). Its normalisation is not a published constant:
the per-channel mean and (population) standard deviation of all pixels of the
decoded train split, in [0, 1] units, computed once and cached. Nothing can be
downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageTree
from .registry import DatasetInfo, Decoded, register

__all__ = ["ImageFolder", "channel_stats"]


def channel_stats(
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


class ImageFolder(ImageTree):
    """A user's tree of class folders; the registry's info is only a template."""

    downloadable = False

    def __init__(self) -> None:
        self.info = DatasetInfo("imagefolder", 0, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @property
    def cached_channels(self) -> int | None:
        return None  # 1 or 3, as the metadata says (older caches lack it: rebuilt)

    def folder_candidates(self, data_dir: Path) -> list[Path]:
        return [data_dir / "train"]

    def finish(self, decoded: Decoded) -> None:
        if decoded.all_gray:
            decoded.images = np.ascontiguousarray(decoded.images[..., :1])

    def extra_meta(self, decoded: Decoded) -> dict[str, Any]:
        mean, std = channel_stats(decoded.images)
        return {"mean": mean, "std": std}

    def loaded_info(self, images: np.ndarray, meta: dict[str, Any]) -> DatasetInfo:
        return dataclasses.replace(
            self.info,
            num_classes=len(meta["classes"]),
            channels=int(images.shape[-1]),
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
        )

    def looked_for(self, data_dir: Path) -> list[str]:
        return ["train/<class>/<image files>  (image folder)"]

    def remedy(self, data_dir: Path) -> list[str]:
        return [
            f"  - put the images in {data_dir}/train/<class name>/, one folder per "
            "class (any size and mode; they are converted to 32x32, 1 channel if all "
            "are grayscale, else RGB)."
        ]


register(ImageFolder())
