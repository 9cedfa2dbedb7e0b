"""EMNIST's six splits (run-config ``emnist-split``), from small generated idx files in
the official format, checked against torchvision's own EMNIST reader; and the
progress lines of a long (Tiny-ImageNet) decode.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.compat import import_torchvision
from common.config import ConfigError, load_run_config
from common.data import client_data_for, load_client_data
from common.datasets import (
    DATASETS,
    EMNIST_CLASSES,
    EMNIST_SPLITS,
    DatasetNotFoundError,
    dataset_info,
    load_train_arrays,
    locate_train_split,
    tiny_imagenet,
)
from common.datasets import cache as dataset_cache
from tests.helpers import write_idx

pytestmark = pytest.mark.usefixtures("isolated_caches")

CACHE = ".mhpfedhn-cache"
RAW = Path("EMNIST") / "raw"
#: Classes of each split as torchvision lists them (letters: "N/A" for label 0).
TV_COUNTS = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 27,
    "digits": 10,
    "mnist": 10,
}


def write_split(
    root: Path, split: str, n: int = 40, gz: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The train idx files of ``split`` as NIST ships them: labels in the file's own
    range (letters: 1..26)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    first = 1 if split == "letters" else 0
    labels = (first + np.arange(n) % (TV_COUNTS[split] - first)).astype(np.uint8)
    labels = rng.permutation(labels)
    prefix = f"emnist-{split}-train"
    write_idx(root / RAW / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(root / RAW / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


def test_split_classes_are_torchvisions():
    tv = import_torchvision()
    assert EMNIST_SPLITS == tv.datasets.EMNIST.splits
    for split, classes in EMNIST_CLASSES.items():
        expected = tv.datasets.EMNIST.classes_split_dict[split]
        if split == "letters":
            assert expected[0] == "N/A"
            expected = expected[1:]  # the empty class 0 is dropped here
        assert list(classes) == expected, split
        assert dataset_info("emnist", emnist_split=split).num_classes == len(classes)
    assert DATASETS["emnist"] == dataset_info("emnist")  # byclass by default
    assert dataset_info("emnist").num_classes == 62


@pytest.mark.parametrize("split", EMNIST_SPLITS)
def test_each_split_loads_as_torchvision_reads_it(tmp_path, split):
    images, labels = write_split(tmp_path, split)
    x, y, info = load_train_arrays(
        "emnist", tmp_path, download=False, emnist_split=split
    )
    assert x.shape == (40, 32, 32, 1) and x.dtype == np.uint8
    assert info.name == "emnist" and info.channels == 1
    assert info.num_classes == len(EMNIST_CLASSES[split])
    assert (info.mean, info.std) == ((0.5,), (0.5,))
    tv = import_torchvision()
    ds = tv.datasets.EMNIST(
        str(tmp_path),
        split=split,
        train=True,
        download=False,
        transform=tv.transforms.Resize((32, 32)),
    )
    shift = 1 if split == "letters" else 0
    assert np.array_equal(y, ds.targets.numpy() - shift)
    assert y.min() >= 0 and y.max() < info.num_classes
    for i in (0, 7, 39):  # same bytes, orientation and resize as torchvision
        img, _ = ds[i]
        assert np.array_equal(x[i, :, :, 0], np.asarray(img))
    stem = "emnist" if split == "byclass" else f"emnist-{split}"
    assert (tmp_path / CACHE / f"{stem}-train-32x32.images.npy").is_file()


def test_splits_side_by_side_keep_their_own_caches(tmp_path, monkeypatch):
    _, byclass = write_split(tmp_path, "byclass", n=30, gz=True)
    _, letters = write_split(tmp_path, "letters", n=26, gz=True, seed=1)
    calls: list[str] = []
    real = dataset_cache._decode

    def counting(dataset, source):
        calls.append(dataset.cache_stem)
        return real(dataset, source)

    monkeypatch.setattr(dataset_cache, "_decode", counting)
    for _ in range(2):  # the second pass reads both caches
        assert np.array_equal(load_train_arrays("emnist", tmp_path)[1], byclass)
        y = load_train_arrays("emnist", tmp_path, emnist_split="letters")[1]
        assert np.array_equal(y, letters.astype(np.int64) - 1)
    assert calls == ["emnist", "emnist-letters"]
    assert sorted(p.name for p in (tmp_path / CACHE).glob("*.json")) == [
        "emnist-letters-train-32x32.json",
        "emnist-train-32x32.json",  # byclass keeps its name
    ]


def test_bad_split_and_out_of_range_labels(tmp_path):
    with pytest.raises(ValueError, match="unknown EMNIST split 'lowercase'"):
        load_train_arrays("emnist", tmp_path, emnist_split="lowercase")
    images, labels = write_split(tmp_path, "letters", n=10)
    labels[3] = 0  # letters are labelled 1..26: 0 is no letter
    write_idx(tmp_path / RAW / "emnist-letters-train-labels-idx1-ubyte", labels, False)
    with pytest.raises(ValueError, match=r"has label 0, .* \(labelled 1\.\.26\)"):
        load_train_arrays("emnist", tmp_path, emnist_split="letters")
    write_split(tmp_path, "digits", n=10)
    write_idx(
        tmp_path / RAW / "emnist-digits-train-labels-idx1-ubyte", np.full(10, 10), False
    )
    with pytest.raises(ValueError, match="has label 10, but emnist has 10 classes$"):
        load_train_arrays("emnist", tmp_path, emnist_split="digits")


def test_not_found_names_the_split_files(tmp_path):
    write_split(tmp_path, "byclass")  # another split's files do not count
    with pytest.raises(DatasetNotFoundError) as err:
        locate_train_split("emnist", tmp_path, download=False, emnist_split="balanced")
    message = str(err.value)
    for expected in (
        f"{tmp_path}/EMNIST/raw/emnist-balanced-train-images-idx3-ubyte  or",
        "emnist-balanced-train-labels-idx1-ubyte.gz",
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
    ):
        assert expected in message, expected
    assert "byclass" not in message
    assert locate_train_split("emnist", tmp_path, download=False) == tmp_path / RAW


def test_download_fetches_every_split_once(tmp_path, monkeypatch):
    """torchvision's EMNIST download unpacks NIST's gzip.zip (all splits) into raw/:
    a split asked for later is found without another download."""
    import_torchvision()
    from torchvision.datasets import mnist

    source = tmp_path / "nist"
    for split in ("letters", "balanced"):
        write_split(source, split, n=12, gz=True)
    fetched = []

    def fake_download(url, download_root, md5=None, **kwargs):
        fetched.append(url)
        shutil.copytree(source / RAW, Path(download_root) / "gzip")

    monkeypatch.setattr(mnist, "download_and_extract_archive", fake_download)
    data = tmp_path / "data"
    y = load_train_arrays("emnist", data, emnist_split="letters")[1]
    assert fetched == ["https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"]
    assert y.shape == (12,) and y.min() >= 0
    x, _, info = load_train_arrays("emnist", data, emnist_split="balanced")
    assert len(fetched) == 1 and x.shape == (12, 32, 32, 1)
    assert info.num_classes == 47


def test_run_config_selects_and_checks_the_split(tmp_path):
    assert load_run_config({}).emnist_split == "byclass"
    cfg = load_run_config(
        {"dataset": "emnist", "emnist-split": "letters", "data-dir": str(tmp_path)}
    )
    write_split(tmp_path, "letters", n=200)
    data = client_data_for(cfg, 0, 4)
    assert data.num_classes == 26 and data.in_channels == 1
    assert data.train_y.max() < 26
    # the default split is another dataset as far as the memoised data goes
    write_split(tmp_path, "byclass", n=200)
    other = load_client_data(
        "emnist", tmp_path, 0, 4, "pathological", 2, 0.1, 42, download=False
    )
    assert other.num_classes == 62
    with pytest.raises(ConfigError, match="'emnist-split' = 'byletter' is not allowed"):
        load_run_config({"dataset": "emnist", "emnist-split": "byletter"})
    with pytest.raises(ConfigError, match="allowed: byclass, bymerge, balanced"):
        load_run_config({"dataset": "emnist", "emnist-split": "byletter"})
    with pytest.raises(ConfigError, match="'emnist-split' = 'digits' .* 'cifar10'"):
        load_run_config({"emnist-split": "digits"})
    with pytest.raises(ConfigError, match="'emnist' has 26 classes"):
        load_run_config(
            {"dataset": "emnist", "emnist-split": "letters", "classes-per-client": 27}
        )
    assert load_run_config({"dataset": "emnist", "classes-per-client": 27})


# ----------------------------------------------------- progress of a long decode


def test_tiny_imagenet_first_decode_logs_progress(tmp_path, monkeypatch, caplog):
    ids = [f"n{10_000_000 + 7 * c:08d}" for c in range(200)]
    for wnid in ids:
        folder = tmp_path / "tiny-imagenet-200" / "train" / wnid / "images"
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), (len(wnid), 0, 0)).save(folder / f"{wnid}_0.JPEG")
    monkeypatch.setattr(tiny_imagenet.TinyImageNet, "progress_every", 80)
    with caplog.at_level(logging.INFO, logger="flwr"):
        load_train_arrays("tiny-imagenet", tmp_path, download=False)
    lines = [r.getMessage() for r in caplog.records]
    root = tmp_path / "tiny-imagenet-200" / "train"
    assert lines[0].startswith(
        f"tiny-imagenet: decoding the train images of {root} to 32x32 (200 images)"
    )
    progress = [line for line in lines if "tiny-imagenet: decoded" in line]
    assert [line.split(" images in ")[0] for line in progress] == [
        "tiny-imagenet: decoded 80 / 200",
        "tiny-imagenet: decoded 160 / 200",
    ]
    assert all(line.endswith(" left)") for line in progress)
    assert lines[-1].startswith(f"decoded 200 tiny-imagenet images from {root} in ")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        load_train_arrays("tiny-imagenet", tmp_path, download=False)  # cached
    assert not caplog.records
