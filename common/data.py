"""What one client materialises: its share of the train split, split 75/25, as tensors.

:func:`load_client_data` follows PAPER.md "Data and evaluation":

1. ``images, labels = load_train_arrays(dataset, data_dir)`` — the official train
   split (EMNIST: of the run config's ``emnist-split``), images memory-mapped from
   the decoded cache (nothing is read yet);
2. the partition of all clients is computed from the labels alone
   (:func:`common.partition.partition_indices`, deterministic for the seed), and
   only this client's rows are read from the memory map (one sorted fancy index);
3. those rows are shuffled and split 75/25 into local train/test
   (:func:`common.partition.split_train_test`) with a seed derived from
   ``(seed, partition_id)``;
4. pixels become ``float32`` NCHW tensors normalised per channel,
   ``x = (p / 255 - mean) / std`` with the dataset's mean/std.

Results are memoised per process (keyed by every argument), so a long-lived simulation
worker reads each client's data once. The cached :class:`ClientData` is shared: do not
modify its tensors in place. Memory bound: at most the whole train split as float32
per process (about 614 MB for CIFAR-10) if one process hosts every client.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.datasets import DEFAULT_EMNIST_SPLIT, DatasetInfo, load_train_arrays
from common.partition import DIRICHLET_MIN_SIZE, partition_indices, split_train_test

if TYPE_CHECKING:
    from common.config import RunConfig

__all__ = [
    "ClientData",
    "clear_cache",
    "client_data_for",
    "client_split_seed",
    "load_client_data",
    "to_tensor",
]


@dataclass
class ClientData:
    """A client's local data: ``*_x`` float32 ``(N, C, 32, 32)`` normalised,
    ``*_y`` int64 class labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


def client_split_seed(seed: int, partition_id: int) -> int:
    """Seed of a client's 75/25 split: a 63-bit integer derived from
    ``np.random.SeedSequence([seed, partition_id])``, distinct per client."""
    state = np.random.SeedSequence([seed, partition_id]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def to_tensor(pixels: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    """``uint8`` NHWC pixels -> ``float32`` NCHW ``(p / 255 - mean) / std``.

    The result is stored channels-last (NHWC in memory, NCHW in shape), the layout
    oneDNN's CPU convolutions work in and the pixels' own: a training step of the
    paper's models took 0.72-0.92x its NCHW time (``python -m bench.step``).
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(torch.float32).div_(255)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


@dataclass(frozen=True)
class _Setup:
    """Everything that fixes the partition (hashable: the key of the caches below).
    The parameter of the scheme not in use is None so that it cannot split a cache."""

    dataset: str
    emnist_split: str | None
    data_dir: str
    download: bool
    num_partitions: int
    scheme: str
    classes_per_client: int | None
    dirichlet_alpha: float | None
    dirichlet_min_size: int | None
    seed: int


@functools.lru_cache(maxsize=4)
def _train_arrays(
    dataset: str, emnist_split: str | None, data_dir: str, download: bool
) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    return load_train_arrays(
        dataset,
        data_dir,
        download=download,
        emnist_split=emnist_split or DEFAULT_EMNIST_SPLIT,
    )


def _setup_arrays(setup: _Setup) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    return _train_arrays(
        setup.dataset, setup.emnist_split, setup.data_dir, setup.download
    )


@functools.lru_cache(maxsize=8)
def _partition(setup: _Setup) -> tuple[np.ndarray, ...]:
    labels = _setup_arrays(setup)[1]
    parts = partition_indices(
        labels,
        setup.num_partitions,
        setup.scheme,
        setup.seed,
        setup.classes_per_client,
        setup.dirichlet_alpha,
        dirichlet_min_size=setup.dirichlet_min_size or 0,
    )
    return tuple(parts)


@functools.cache
def _client_data(setup: _Setup, partition_id: int) -> ClientData:
    images, labels, info = _setup_arrays(setup)
    rows = _partition(setup)[partition_id]
    pixels = np.asarray(images[rows])  # reads only this client's rows of the memmap
    targets = labels[rows]
    train, test = split_train_test(
        np.arange(len(rows)), client_split_seed(setup.seed, partition_id)
    )
    return ClientData(
        train_x=to_tensor(pixels[train], info),
        train_y=torch.from_numpy(targets[train].astype(np.int64)),
        test_x=to_tensor(pixels[test], info),
        test_y=torch.from_numpy(targets[test].astype(np.int64)),
        num_classes=info.num_classes,
        in_channels=info.channels,
    )


def load_client_data(
    dataset: str,
    data_dir: str | os.PathLike[str],
    partition_id: int,
    num_partitions: int,
    partition: str,
    classes_per_client: int,
    dirichlet_alpha: float,
    seed: int,
    download: bool = True,
    dirichlet_min_size: int = DIRICHLET_MIN_SIZE,
    emnist_split: str = DEFAULT_EMNIST_SPLIT,
) -> ClientData:
    """Client ``partition_id``'s local train/test data (see the module docstring).

    ``partition`` is ``"pathological"`` (uses ``classes_per_client``) or
    ``"dirichlet"`` (uses ``dirichlet_alpha`` and ``dirichlet_min_size``, the
    smallest client share accepted, 31 in the paper); ``emnist_split`` is used by
    ``emnist`` only. Raises ``ValueError`` for a
    ``partition_id`` outside ``[0, num_partitions)`` or an unknown scheme, and
    :class:`common.datasets.DatasetNotFoundError` when the data cannot be found.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be in [0, {num_partitions}) for {num_partitions} "
            f"partitions, got {partition_id}"
        )
    pathological = partition == "pathological"
    setup = _Setup(
        dataset=dataset,
        emnist_split=emnist_split if dataset == "emnist" else None,
        data_dir=str(Path(data_dir).expanduser().resolve()),
        download=bool(download),
        num_partitions=int(num_partitions),
        scheme=partition,
        classes_per_client=int(classes_per_client) if pathological else None,
        dirichlet_alpha=None if pathological else float(dirichlet_alpha),
        dirichlet_min_size=None if pathological else int(dirichlet_min_size),
        seed=int(seed),
    )
    return _client_data(setup, int(partition_id))


def client_data_for(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    data_dir: str | os.PathLike[str] | None = None,
) -> ClientData:
    """:func:`load_client_data` with a run config's dataset, partition and seed;
    ``data_dir`` overrides the config's (a node's own copy of the data)."""
    return load_client_data(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir if data_dir is None else data_dir,
        partition_id=partition_id,
        num_partitions=num_partitions,
        partition=cfg.partition,
        classes_per_client=cfg.classes_per_client,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        download=cfg.download,
        dirichlet_min_size=cfg.dirichlet_min_size,
        emnist_split=cfg.emnist_split,
    )


def clear_cache() -> None:
    """Forget every memoised dataset, partition and client (e.g. between tests)."""
    for cached in (_client_data, _partition, _train_arrays):
        cached.cache_clear()
