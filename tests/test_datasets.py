"""Dataset loading on small generated files in the official formats (no network).

torchvision's real CIFAR reader is exercised on fake ``cifar-10-batches-py`` and
``cifar-100-python`` folders written like the official pickles (Python 2 ``str`` keys:
``b"data"`` / ``b"labels"`` when read with ``encoding="bytes"``). torchvision checks
the md5 sum of every file against the official ones when ``download=False``; the
``tv_cifar`` fixture replaces only that check (``torchvision.datasets.cifar.
check_integrity``) by "the file exists", in the tests only.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tarfile
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from common.compat import import_torchvision
from common.data import load_client_data
from common.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    DatasetNotFoundError,
    load_train_arrays,
)
from common.datasets import cache as dataset_cache
from common.partition import partition_indices

pytestmark = pytest.mark.usefixtures("isolated_caches")

CACHE = ".mhpfedhn-cache"


@pytest.fixture
def tv_cifar(monkeypatch):
    """torchvision's CIFAR module with its md5 check reduced to "the file exists"."""
    import_torchvision()
    from torchvision.datasets import cifar

    monkeypatch.setattr(
        cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    return cifar


# ------------------------------------------------------- official-format writers


class Py2Str(bytes):
    """A Python 2 ``str``, pickled as BINSTRING like in the official CIFAR files."""


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler accepts new types
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj: Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def dump_py2(path: Path, entries: dict[str, Any]) -> None:
    """Pickle a dict whose keys and strings are Python 2 ``str`` (protocol 2)."""

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return Py2Str(value.encode())
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    with open(path, "wb") as handle:
        Py2Pickler(handle, protocol=2).dump(
            {convert(k): convert(v) for k, v in entries.items()}
        )


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def batch(images: np.ndarray, label_key: str, labels: np.ndarray) -> dict[str, Any]:
    """One official batch: rows of 3072 bytes, channel-major (R plane, G, B)."""
    return {
        "batch_label": "generated batch",
        label_key: labels.tolist(),
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }


def write_cifar10(root: Path, per_batch: int = 12) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = random_images(5 * per_batch, seed=1)
    labels = np.arange(5 * per_batch) % 10
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        dump_py2(
            folder / f"data_batch_{b + 1}", batch(images[rows], "labels", labels[rows])
        )
    dump_py2(
        folder / "test_batch", batch(random_images(10, 2), "labels", np.arange(10))
    )
    dump_py2(
        folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    )
    return images, labels


def write_cifar100(root: Path, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images = random_images(n, seed=3)
    fine = np.arange(n) % 100
    for name, imgs, labels in (("train", images, fine), ("test", images[:5], fine[:5])):
        entries = batch(imgs, "fine_labels", labels) | {
            "coarse_labels": (labels // 5).tolist()
        }
        dump_py2(folder / name, entries)
    coarse = [f"superclass_{i}" for i in range(20)]
    dump_py2(
        folder / "meta",
        {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": coarse},
    )
    return images, fine


def write_tree(
    root: Path, classes: list[str], per_class: int = 2, fmt: str = "PNG"
) -> np.ndarray:
    """Write ``root/<class>/<i>.png`` 32x32 RGB images; return them in label order."""
    images = random_images(len(classes) * per_class, seed=5)
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(images[c * per_class + i]).save(
                root / cls / f"{i:04d}.{fmt.lower()}", fmt
            )
    return images


def make_archive(tree_parent: Path, top: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree_parent / top, arcname=top)


# ------------------------------------------------------------- torchvision layout


def test_cifar10_official_files_read_by_torchvision(tmp_path, tv_cifar):
    images, labels = write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        assert {b"data", b"labels"} <= set(pickle.load(handle, encoding="bytes"))
    x, y, info = load_train_arrays("cifar10", tmp_path, download=False)
    assert (
        isinstance(x, np.memmap) and x.dtype == np.uint8 and x.shape == (60, 32, 32, 3)
    )
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    assert np.array_equal(x, images)
    assert info == DATASETS["cifar10"]
    assert (tmp_path / CACHE / "cifar10-train-32x32.images.npy").is_file()


def test_cifar100_official_files_read_by_torchvision(tmp_path, tv_cifar):
    images, labels = write_cifar100(tmp_path)
    x, y, info = load_train_arrays("cifar100", tmp_path, download=False)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    assert info.num_classes == 100 and info.mean == (0.5071, 0.4865, 0.4409)


def test_official_files_failing_md5_are_reported(tmp_path):
    write_cifar10(tmp_path)  # generated files never match the official md5 sums
    with pytest.raises(DatasetNotFoundError, match="md5"):
        load_train_arrays("cifar10", tmp_path, download=False)


def test_download_goes_through_torchvision(tmp_path, tv_cifar, monkeypatch):
    written = {}

    def fake_download(url, download_root, **kwargs):
        written["images"], written["labels"] = write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    x, y, _ = load_train_arrays("cifar10", tmp_path / "new", download=True)
    assert np.array_equal(x, written["images"]) and np.array_equal(y, written["labels"])


def test_failed_download_is_reported(tmp_path, tv_cifar, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError) as err:
        load_train_arrays("cifar10", tmp_path, download=True)
    assert "Name or service not known" in str(err.value)
    assert "no network" in str(err.value)


def test_not_found_message_names_folder_layouts_and_remedy(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_train_arrays("cifar10", tmp_path, download=False)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for expected in (
        "'cifar10'",
        str(tmp_path),
        "cifar-10-batches-py",
        "cifar10-jpg/train/<class>",
        "cifar10-jpg.tar.gz",
        "download=False",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ):
        assert expected in message


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        load_train_arrays("svhn", tmp_path)


# ----------------------------------------------------------- image folders, archives


@pytest.mark.parametrize("layout", ["cifar10-jpg/train", "cifar10/train", "train"])
def test_cifar10_image_folder_layouts_and_label_order(tmp_path, layout):
    images = write_tree(tmp_path / layout, list(CIFAR10_CLASSES))
    x, y, info = load_train_arrays("cifar10", tmp_path, download=False)
    assert np.array_equal(x, images)  # PNG is lossless
    assert np.array_equal(y, np.repeat(np.arange(10), 2))
    assert info == DATASETS["cifar10"]


def test_cifar10_image_folder_needs_official_class_names(tmp_path):
    classes = [*CIFAR10_CLASSES[:9], "lorry"]
    write_tree(tmp_path / "cifar10-jpg" / "train", classes, per_class=1)
    with pytest.raises(ValueError, match="not the official cifar10 classes"):
        load_train_arrays("cifar10", tmp_path, download=False)


def test_archive_is_read_in_place_and_equals_the_tree(tmp_path):
    tree_dir, archive_dir = tmp_path / "tree", tmp_path / "archive"
    write_tree(tree_dir / "cifar10-jpg" / "train", list(CIFAR10_CLASSES), fmt="JPEG")
    archive_dir.mkdir()
    make_archive(tree_dir, "cifar10-jpg", archive_dir / "cifar10-jpg.tar.gz")
    x_tree, y_tree, _ = load_train_arrays("cifar10", tree_dir, download=False)
    x_tar, y_tar, _ = load_train_arrays("cifar10", archive_dir, download=False)
    assert x_tar.shape == (20, 32, 32, 3)
    assert np.array_equal(x_tar, x_tree) and np.array_equal(y_tar, y_tree)
    assert sorted(p.name for p in archive_dir.iterdir()) == [
        CACHE,
        "cifar10-jpg.tar.gz",
    ]


def test_archive_with_unsafe_member_is_refused(tmp_path):
    write_tree(tmp_path / "src", ["a"], per_class=1)
    with tarfile.open(tmp_path / "cifar10-jpg.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "a" / "0000.png", arcname="train/../../evil.png")
    with pytest.raises(ValueError, match="unsafe"):
        load_train_arrays("cifar10", tmp_path, download=False)


def test_imagefolder_any_size_and_mode(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    specs = {
        "cat": [("a.png", "L", (40, 20)), ("b.PNG", "RGBA", (32, 32))],
        "dog": [("images/c.jpg", "RGB", (64, 48)), ("d.gif", "P", (16, 16))],
    }
    for cls, files in specs.items():
        for name, mode, size in files:
            (root / cls / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / cls / name)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"not decoded")
    x, y, info = load_train_arrays("imagefolder", tmp_path)
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 1, 1]
    assert info.num_classes == 2 and info.channels == 3
    pixels = np.asarray(x, dtype=np.float64).reshape(-1, 3) / 255
    assert np.allclose(info.mean, pixels.mean(0), atol=1e-5)
    assert np.allclose(info.std, pixels.std(0), atol=1e-5)
    with Image.open(root / "dog" / "images" / "c.jpg") as img:
        expected = np.asarray(
            img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        )
    assert np.array_equal(x[3], expected)  # "d.gif" sorts before "images/c.jpg"


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="imagefolder"):
        load_train_arrays("imagefolder", tmp_path)
    write_tree(tmp_path / "train", ["full"], per_class=1)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_train_arrays("imagefolder", tmp_path)


# ------------------------------------------------------------------------- cache


def count_decodes(monkeypatch, delay: float = 0.0) -> list[str]:
    calls: list[str] = []
    real = dataset_cache._decode

    def counting(dataset, source):
        calls.append(dataset.name)
        time.sleep(delay)
        return real(dataset, source)

    monkeypatch.setattr(dataset_cache, "_decode", counting)
    return calls


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    root = tmp_path / "train"
    write_tree(root, ["a", "b"], per_class=3)
    calls = count_decodes(monkeypatch)
    x1, y1, _ = load_train_arrays("imagefolder", tmp_path)
    x2, y2, _ = load_train_arrays("imagefolder", tmp_path)
    assert len(calls) == 1
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    cached = sorted(p.name for p in (tmp_path / CACHE).iterdir())
    assert cached == [
        f"imagefolder-train-32x32{ext}"
        for ext in (".images.npy", ".json", ".labels.npy", ".lock")
    ]
    Image.fromarray(random_images(1, 9)[0]).save(root / "b" / "extra.png")
    x3, _, _ = load_train_arrays("imagefolder", tmp_path)
    assert len(calls) == 2 and len(x3) == 7


def test_concurrent_loads_decode_once(tmp_path, monkeypatch):
    write_tree(tmp_path / "train", ["a", "b"], per_class=2)
    calls = count_decodes(monkeypatch, delay=0.5)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(load_train_arrays("imagefolder", tmp_path)[0])
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2
    assert np.array_equal(results[0], results[1])


def test_read_only_data_dir_caches_in_user_cache(tmp_path):
    data_dir = tmp_path / "ro"
    write_tree(data_dir / "train", ["a", "b"], per_class=1)
    data_dir.chmod(0o555)
    try:
        load_train_arrays("imagefolder", data_dir)
    finally:
        data_dir.chmod(0o755)
    assert not (data_dir / CACHE).exists()
    digest = hashlib.sha1(str((data_dir / "train").resolve()).encode()).hexdigest()
    user_cache = Path(os.environ["XDG_CACHE_HOME"]) / "mh-pfedhn" / digest
    assert (user_cache / "imagefolder-train-32x32.images.npy").is_file()


# ------------------------------------------------------------------- client data


def image_rows(images: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): row for row, img in enumerate(images)}


def rows_of(x: torch.Tensor, rows: dict[bytes, int]) -> list[int]:
    """Map normalised NCHW tensors back to rows of the uint8 train split."""
    info = DATASETS["cifar10"]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    pixels = (
        ((x * std + mean) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    )
    return [rows[p.tobytes()] for p in pixels]


@pytest.mark.parametrize("scheme", ["pathological", "dirichlet"])
def test_load_client_data_gives_only_its_partition_split_75_25(
    tmp_path, tv_cifar, scheme
):
    images, labels = write_cifar10(tmp_path, per_batch=40)
    rows = image_rows(images)
    parts = partition_indices(labels, 4, scheme, 42, 2, 1.0)
    for pid in range(4):
        cd = load_client_data(
            "cifar10", tmp_path, pid, 4, scheme, 2, 1.0, 42, download=False
        )
        assert cd.train_x.dtype == torch.float32 and cd.train_x.shape[1:] == (3, 32, 32)
        assert cd.train_y.dtype == torch.int64
        assert (cd.num_classes, cd.in_channels) == (10, 3)
        n = len(parts[pid])
        assert (cd.num_train, cd.num_test) == (int(0.75 * n), n - int(0.75 * n))
        train_rows, test_rows = rows_of(cd.train_x, rows), rows_of(cd.test_x, rows)
        assert not set(train_rows) & set(test_rows)
        assert sorted(train_rows + test_rows) == parts[pid].tolist()
        assert cd.train_y.tolist() == labels[train_rows].tolist()
        assert cd.test_y.tolist() == labels[test_rows].tolist()
    again = load_client_data(
        "cifar10", tmp_path, 0, 4, scheme, 2, 1.0, 42, download=False
    )
    assert again is load_client_data(
        "cifar10", str(tmp_path), 0, 4, scheme, 2, 1.0, 42, download=False
    )


def test_load_client_data_rejects_bad_partition_id(tmp_path):
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 4\)"):
        load_client_data("cifar10", tmp_path, 4, 4, "pathological", 2, 0.1, 42)


# -------------------------------------------------------------- real CIFAR-10 copy


def test_real_cifar10_jpeg_copy(cifar10_dir):
    start = time.perf_counter()
    x, y, info = load_train_arrays("cifar10", cifar10_dir, download=False)
    assert time.perf_counter() - start < 5, "the session fixture built the cache"
    assert isinstance(x, np.memmap) and x.shape == (50000, 32, 32, 3)
    assert np.array_equal(np.bincount(y), np.full(10, 5000))
    sample = np.asarray(x[::10], dtype=np.float64).reshape(-1, 3) / 255
    assert np.allclose(
        sample.mean(0), info.mean, atol=0.01
    )  # JPEG: nearly the originals
    cd = load_client_data(
        "cifar10", cifar10_dir, 0, 10, "pathological", 2, 0.1, 42, download=False
    )
    # Seed 42: client 0 holds classes 1 and 8, as in the authors' code.
    assert set(torch.unique(cd.train_y).tolist()) == {1, 8}
    assert cd.num_train + cd.num_test == len(
        partition_indices(y, 10, "pathological", 42, 2, 0.1)[0]
    )
    assert cd.num_train == int(0.75 * (cd.num_train + cd.num_test))
