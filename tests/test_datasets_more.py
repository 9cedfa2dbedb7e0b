"""MNIST, Fashion-MNIST, EMNIST, Tiny-ImageNet and grayscale image folders, loaded
from small generated files in the official formats (no network).

The idx files are written byte for byte like the official ones (gzipped and plain) and
the results are checked against torchvision's own readers: its EMNIST dataset for the
bytes and their orientation, ``transforms.Resize((32, 32))`` for the 28->32 and 64->32
resize, and ``ImageFolder`` over ``tiny-imagenet-200/train`` for the label order.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.compat import import_torchvision
from common.config import ConfigError, load_run_config
from common.data import load_client_data
from common.datasets import (
    DATASETS,
    EMNIST_BYCLASS_CLASSES,
    TINY_IMAGENET_URL,
    DatasetNotFoundError,
    load_train_arrays,
)
from common.datasets import cache as dataset_cache
from common.partition import partition_indices
from tests.helpers import idx_bytes, write_idx

pytestmark = pytest.mark.usefixtures("isolated_caches")

CACHE = ".mhpfedhn-cache"
RAW = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "emnist": "EMNIST"}
PREFIX = {"mnist": "train", "fashion-mnist": "train", "emnist": "emnist-byclass-train"}


def count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = dataset_cache._decode

    def counting(dataset, source):
        calls.append(dataset.name)
        return real(dataset, source)

    monkeypatch.setattr(dataset_cache, "_decode", counting)
    return calls


def resize_like_torchvision(img: Image.Image) -> np.ndarray:
    """What the reference pipeline sees: ``transforms.Resize((32, 32))`` on PIL."""
    tv = import_torchvision()
    return np.asarray(tv.transforms.Resize((32, 32))(img))


# ------------------------------------------------------------------- idx writers


def digits(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
    return images, labels


def write_train_split(
    root: Path, name: str, n: int = 30, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits(n, DATASETS[name].num_classes, seed)
    raw = root / RAW[name] / "raw"
    write_idx(raw / f"{PREFIX[name]}-images-idx3-ubyte", images, gz)
    write_idx(raw / f"{PREFIX[name]}-labels-idx1-ubyte", labels, gz)
    return images, labels


# ---------------------------------------------------------- MNIST-like datasets


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "emnist"])
def test_idx_train_split_resized_to_32x32_one_channel(tmp_path, name, gz):
    images, labels = write_train_split(tmp_path, name, gz=gz)
    x, y, info = load_train_arrays(name, tmp_path, download=False)
    assert isinstance(x, np.memmap) and x.dtype == np.uint8
    assert x.shape == (30, 32, 32, 1)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    assert info == DATASETS[name] and info.channels == 1
    assert len(info.mean) == len(info.std) == 1
    assert info.num_classes == {"mnist": 10, "fashion-mnist": 10, "emnist": 62}[name]
    for i in (0, 17):  # bilinear 28->32, exactly as torchvision's Resize on PIL
        expected = resize_like_torchvision(Image.fromarray(images[i]))
        assert np.array_equal(x[i, :, :, 0], expected)
    meta = json.loads((tmp_path / CACHE / f"{name}-train-32x32.json").read_text())
    assert meta["channels"] == 1 and meta["num_samples"] == 30
    assert (tmp_path / CACHE / f"{name}-train-32x32.images.npy").is_file()


def test_normalisation_constants():
    assert DATASETS["emnist"].mean == (0.5,) and DATASETS["emnist"].std == (0.5,)
    assert DATASETS["mnist"].mean == (0.1307,) and DATASETS["mnist"].std == (0.3081,)
    fashion = DATASETS["fashion-mnist"]
    assert fashion.mean == (0.2860,) and fashion.std == (0.3530,)
    tiny = DATASETS["tiny-imagenet"]
    assert (tiny.num_classes, tiny.channels) == (200, 3)
    assert tiny.mean == (0.4802, 0.4481, 0.3975)
    assert tiny.std == (0.2770, 0.2691, 0.2821)
    assert EMNIST_BYCLASS_CLASSES[:11] == tuple("0123456789A")
    assert EMNIST_BYCLASS_CLASSES[-1] == "z" and len(EMNIST_BYCLASS_CLASSES) == 62


def test_emnist_matches_torchvision_reader_and_orientation(tmp_path):
    """Same bytes, same (transposed) orientation and same resize as the reference
    pipeline ``EMNIST(split="byclass")`` + ``Resize((32, 32))``."""
    images, labels = write_train_split(tmp_path, "emnist", n=20, gz=False)
    tv = import_torchvision()
    ds = tv.datasets.EMNIST(
        str(tmp_path),
        split="byclass",
        train=True,
        download=False,
        transform=tv.transforms.Resize((32, 32)),
    )
    assert list(ds.classes) == list(EMNIST_BYCLASS_CLASSES)
    assert np.array_equal(ds.data.numpy(), images)  # no transpose either side
    x, y, _ = load_train_arrays("emnist", tmp_path, download=False)
    assert np.array_equal(y, ds.targets.numpy())
    for i in range(len(ds)):
        img, target = ds[i]
        assert np.array_equal(x[i, :, :, 0], np.asarray(img)) and y[i] == target


def test_plain_idx_file_wins_over_gz_and_files_may_mix(tmp_path):
    images, labels = write_train_split(tmp_path, "mnist", n=12, gz=False)
    raw = tmp_path / "MNIST" / "raw"
    other = np.zeros((12, 28, 28), np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", other, gz=True)  # ignored
    (raw / "train-labels-idx1-ubyte").rename(tmp_path / "labels")
    write_idx(raw / "train-labels-idx1-ubyte", labels, gz=True)  # used: only copy
    x, y, _ = load_train_arrays("mnist", tmp_path, download=False)
    assert x[:, :, :, 0].any() and np.array_equal(y, labels)


def test_idx_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    write_train_split(tmp_path, "mnist", n=10, gz=True)
    calls = count_decodes(monkeypatch)
    x1, _, _ = load_train_arrays("mnist", tmp_path, download=False)
    x2, _, _ = load_train_arrays("mnist", tmp_path, download=False)
    assert len(calls) == 1 and np.array_equal(x1, x2)
    assert sorted(p.name for p in (tmp_path / CACHE).iterdir()) == [
        f"mnist-train-32x32{ext}"
        for ext in (".images.npy", ".json", ".labels.npy", ".lock")
    ]
    # an unrelated file in the raw folder (e.g. the test split) changes nothing
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", np.zeros(3), gz=False)
    load_train_arrays("mnist", tmp_path, download=False)
    assert len(calls) == 1
    time.sleep(0.01)  # a new mtime even on coarse clocks
    images, labels = write_train_split(tmp_path, "mnist", n=14, gz=True, seed=1)
    x3, y3, _ = load_train_arrays("mnist", tmp_path, download=False)
    assert len(calls) == 2 and x3.shape == (14, 32, 32, 1)
    assert np.array_equal(y3, labels)


def test_malformed_idx_files_are_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images, labels = digits(10, 10, 0)
    write_idx(raw / "train-images-idx3-ubyte", images, gz=False)
    write_idx(raw / "train-labels-idx1-ubyte", labels[:9], gz=False)
    with pytest.raises(ValueError, match="10 images but .* 9 labels"):
        load_train_arrays("mnist", tmp_path, download=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.full(10, 10), gz=False)
    with pytest.raises(ValueError, match="label 10, but mnist has 10 classes"):
        load_train_arrays("mnist", tmp_path, download=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an idx file"):
        load_train_arrays("mnist", tmp_path, download=False)
    write_idx(raw / "train-labels-idx1-ubyte", labels, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match="truncated"):
        load_train_arrays("mnist", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read the idx files of mnist"):
        load_train_arrays("mnist", tmp_path, download=False)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "emnist"])
def test_idx_not_found_message(tmp_path, name):
    (tmp_path / RAW[name] / "raw").mkdir(parents=True)  # labels only: not enough
    write_idx(
        tmp_path / RAW[name] / "raw" / f"{PREFIX[name]}-labels-idx1-ubyte",
        np.zeros(3),
        gz=True,
    )
    with pytest.raises(DatasetNotFoundError) as err:
        load_train_arrays(name, tmp_path, download=False)
    message = str(err.value)
    raw = f"{tmp_path}/{RAW[name]}/raw"
    for expected in (
        f"Dataset {name!r} not found in {tmp_path}",
        f"{raw}/{PREFIX[name]}-images-idx3-ubyte  or",
        f"{PREFIX[name]}-images-idx3-ubyte.gz",
        f"{PREFIX[name]}-labels-idx1-ubyte.gz",
        "download=False",
        "run once with download enabled",
        f"into {raw}/",
    ):
        assert expected in message, expected
    if name == "emnist":
        assert "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip" in message


@pytest.fixture
def tv_mnist():
    import_torchvision()
    from torchvision.datasets import mnist

    return mnist


def test_mnist_download_goes_through_torchvision(tmp_path, tv_mnist, monkeypatch):
    images, labels = digits(16, 10, 3)
    fetched = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        fetched.append(filename)
        test_split = filename.startswith("t10k")
        array = (labels if "labels" in filename else images)[: 4 if test_split else 16]
        write_idx(Path(download_root) / filename.removesuffix(".gz"), array, gz=False)

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    x, y, info = load_train_arrays("mnist", tmp_path / "new", download=True)
    assert "train-images-idx3-ubyte.gz" in fetched
    assert x.shape == (16, 32, 32, 1) and np.array_equal(y, labels)
    assert info.channels == 1


def test_failed_idx_download_is_reported(tmp_path, tv_mnist, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError) as err:
        load_train_arrays("fashion-mnist", tmp_path, download=True)
    assert "Name or service not known" in str(err.value)
    assert "FashionMNIST/raw" in str(err.value)


def test_load_client_data_one_channel(tmp_path):
    images, labels = write_train_split(tmp_path, "mnist", n=400, gz=True)
    parts = partition_indices(labels.astype(np.int64), 5, "pathological", 42, 2, 0.1)
    resized = load_train_arrays("mnist", tmp_path, download=False)[0]
    cd = load_client_data(
        "mnist", tmp_path, 1, 5, "pathological", 2, 0.1, 42, download=False
    )
    assert (cd.num_classes, cd.in_channels) == (10, 1)
    assert cd.train_x.dtype == torch.float32 and cd.train_x.shape[1:] == (1, 32, 32)
    assert cd.test_x.shape[1:] == (1, 32, 32)
    assert cd.num_train + cd.num_test == len(parts[1])
    assert set(cd.train_y.tolist()) | set(cd.test_y.tolist()) == set(
        labels[parts[1]].tolist()
    )
    # normalised with MNIST's constants: (p / 255 - 0.1307) / 0.3081
    pixels = ((cd.train_x * 0.3081 + 0.1307) * 255).round().to(torch.uint8)
    known = {img.tobytes() for img in np.asarray(resized[parts[1]])}
    assert all(p.permute(1, 2, 0).numpy().tobytes() in known for p in pixels)


def test_unknown_name_and_run_config():
    with pytest.raises(ValueError, match="choose one of .*'emnist'.*'tiny-imagenet'"):
        load_train_arrays("svhn", "/nonexistent")
    assert load_run_config({"dataset": "emnist", "classes-per-client": 6})
    assert load_run_config({"dataset": "tiny-imagenet", "classes-per-client": 20})
    with pytest.raises(ConfigError, match="'fashion-mnist' has 10 classes"):
        load_run_config({"dataset": "fashion-mnist", "classes-per-client": 11})


# ----------------------------------------------------------------- Tiny-ImageNet


def wnids(count: int, seed: int = 0) -> list[str]:
    """Distinct WordNet-like ids in a random (not sorted) order."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**8, size=count, replace=False)
    return [f"n{i:08d}" for i in ids]


def write_tiny_imagenet(root: Path, ids: list[str]) -> dict[str, list[np.ndarray]]:
    """The official layout: train/<wnid>/images/<wnid>_<k>.JPEG (64x64) plus the
    boxes file, wnids.txt and a val folder that must be ignored. The first class gets
    three images, one of them grayscale; the others one."""
    top = root / "tiny-imagenet-200"
    rng = np.random.default_rng(1)
    written: dict[str, list[np.ndarray]] = {}
    for c, wnid in enumerate(ids):
        folder = top / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG 0 0\n")
        written[wnid] = []
        for k in range(3 if c == 0 else 1):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(pixels).convert("L" if k == 2 else "RGB")
            img.save(folder / f"{wnid}_{k}.JPEG", "JPEG", quality=90)
            with Image.open(folder / f"{wnid}_{k}.JPEG") as saved:  # as decoded
                written[wnid].append(resize_like_torchvision(saved.convert("RGB")))
    (top / "wnids.txt").write_text("\n".join(ids) + "\n")
    (top / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(top / "val" / "images" / "val_0.JPEG")
    return written


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("tiny")
    return root, write_tiny_imagenet(root, wnids(200))


def test_tiny_imagenet_official_tree(tiny_tree, tmp_path):
    src, written = tiny_tree
    data_dir = tmp_path / "data"
    shutil.copytree(src, data_dir)
    x, y, info = load_train_arrays("tiny-imagenet", data_dir, download=False)
    assert isinstance(x, np.memmap) and x.dtype == np.uint8
    assert x.shape == (202, 32, 32, 3) and y.dtype == np.int64
    assert info == DATASETS["tiny-imagenet"] and info.channels == 3
    order = sorted(written)  # labels: sorted wnids, not the order of wnids.txt
    assert order != list(written)
    expected_y = [label for label, w in enumerate(order) for _ in written[w]]
    assert y.tolist() == expected_y and len(set(y.tolist())) == 200
    expected_x = np.stack([img for w in order for img in written[w]])
    assert np.array_equal(x, expected_x)  # JPEG decoded by PIL, bilinear 64->32
    gray = x[order.index(list(written)[0]) + 2]
    assert np.array_equal(gray[..., 0], gray[..., 1])  # grayscale JPEG -> RGB
    # torchvision's ImageFolder over train/ gives the same labels in the same order
    tv = import_torchvision()
    folder = tv.datasets.ImageFolder(str(data_dir / "tiny-imagenet-200" / "train"))
    assert folder.classes == order and folder.targets == y.tolist()


def test_tiny_imagenet_zip_read_in_place_and_downloaded(
    tiny_tree, tmp_path, monkeypatch
):
    src, written = tiny_tree
    tree_x, tree_y, _ = load_train_arrays("tiny-imagenet", src, download=False)
    archive = tmp_path / "made" / "tiny-imagenet-200.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(
        archive, "w"
    ) as zf:  # directory entries too, like the real one
        for path in sorted((src / "tiny-imagenet-200").rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())
    calls = []

    def fake_download_url(url, root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does
        shutil.copyfile(archive, Path(root) / filename)

    import_torchvision()
    from torchvision.datasets import utils

    monkeypatch.setattr(utils, "download_url", fake_download_url)
    data_dir = tmp_path / "data"
    x, y, info = load_train_arrays("tiny-imagenet", data_dir, download=True)
    assert calls and calls[0][:2] == (TINY_IMAGENET_URL, "tiny-imagenet-200.zip")
    assert np.array_equal(x, tree_x) and np.array_equal(y, tree_y)
    assert sorted(p.name for p in data_dir.iterdir()) == [
        CACHE,
        "tiny-imagenet-200.zip",
    ]  # nothing extracted
    assert info.num_classes == 200


def test_tiny_imagenet_needs_200_wordnet_classes(tmp_path):
    write_tiny_imagenet(tmp_path, wnids(3))
    with pytest.raises(ValueError, match="200 Tiny-ImageNet class folders.*found 3"):
        load_train_arrays("tiny-imagenet", tmp_path, download=False)


def test_tiny_imagenet_not_found_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_train_arrays("tiny-imagenet", tmp_path, download=False)
    message = str(err.value)
    for expected in (
        "'tiny-imagenet'",
        f"{tmp_path}/tiny-imagenet-200/train/<wnid>/images/*.JPEG",
        f"{tmp_path}/tiny-imagenet-200.zip",
        "download=False",
        TINY_IMAGENET_URL,
    ):
        assert expected in message, expected


# --------------------------------------------------------- grayscale image folders


def write_modes(root: Path, specs: dict[str, list[tuple[str, str]]]) -> None:
    rng = np.random.default_rng(4)
    for cls, files in specs.items():
        (root / cls).mkdir(parents=True)
        for name, mode in files:
            pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / cls / name)


def test_imagefolder_all_grayscale_keeps_one_channel(tmp_path):
    root = tmp_path / "train"
    write_modes(root, {"a": [("0.png", "L"), ("1.png", "LA")], "b": [("2.png", "1")]})
    x, y, info = load_train_arrays("imagefolder", tmp_path)
    assert x.shape == (3, 32, 32, 1) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 1]
    assert info.channels == 1 and info.num_classes == 2
    assert len(info.mean) == len(info.std) == 1
    pixels = np.asarray(x, dtype=np.float64) / 255
    assert np.isclose(info.mean[0], pixels.mean(), atol=1e-5)
    for i, path in enumerate(["a/0.png", "a/1.png", "b/2.png"]):
        with Image.open(root / path) as img:
            expected = resize_like_torchvision(img.convert("L"))
        assert np.array_equal(x[i, :, :, 0], expected)
    cd = load_client_data(
        "imagefolder", tmp_path, 0, 1, "dirichlet", 2, 1.0, 0, dirichlet_min_size=1
    )
    assert cd.in_channels == 1 and cd.train_x.shape[1:] == (1, 32, 32)


def test_imagefolder_mixed_modes_is_rgb_with_gray_images_unchanged(tmp_path):
    root = tmp_path / "train"
    write_modes(root, {"a": [("0.png", "L"), ("1.png", "LA")], "b": [("2.png", "RGB")]})
    x, _, info = load_train_arrays("imagefolder", tmp_path)
    assert x.shape == (3, 32, 32, 3) and info.channels == 3 and len(info.mean) == 3
    for i, path in enumerate(["a/0.png", "a/1.png", "b/2.png"]):
        with Image.open(root / path) as img:  # the pre-existing RGB path, bit for bit
            expected = resize_like_torchvision(img.convert("RGB"))
        assert np.array_equal(x[i], expected)


def test_imagefolder_cache_without_channels_is_rebuilt(tmp_path, monkeypatch):
    write_modes(tmp_path / "train", {"a": [("0.png", "L")], "b": [("1.png", "L")]})
    calls = count_decodes(monkeypatch)
    assert load_train_arrays("imagefolder", tmp_path)[2].channels == 1
    meta_file = tmp_path / CACHE / "imagefolder-train-32x32.json"
    meta = json.loads(meta_file.read_text())
    del meta["channels"]  # as written before grayscale folders were kept gray
    meta_file.write_text(json.dumps(meta))
    x, _, info = load_train_arrays("imagefolder", tmp_path)
    assert len(calls) == 2 and x.shape[-1] == info.channels == 1
