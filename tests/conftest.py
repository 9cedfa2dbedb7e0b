"""Shared fixtures.

``cifar10_dir``: a data folder holding the real CIFAR-10 JPEG copy
(``../shared/data/cifar10-jpg.tar.gz`` next to the repository root, linked in) with
its decoded cache already built, so every test of the session can pass it as
``data-dir`` and load CIFAR-10 in well under a second. The decode (about 10 s) runs
once per session, or once per machine when ``MHPFEDHN_TEST_DATA_CACHE`` names a folder
to keep between sessions. Tests using it are skipped when the copy is absent.

``cifar10_or_stand_in``: run-config keys naming that copy, or a generated stand-in
(a learnable 10-class image folder) when it is absent.

``isolated_caches`` (for dataset tests, by ``pytest.mark.usefixtures``): no test
writes to ~/.cache or sees another test's memoised client data.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_ARCHIVE = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data folder with the real CIFAR-10 (JPEG copy), decoded and cached."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEG copy not found at {CIFAR10_ARCHIVE}")
    from common.datasets import load_train_arrays

    persistent = os.environ.get("MHPFEDHN_TEST_DATA_CACHE")
    if persistent:
        data_dir = Path(persistent).expanduser().absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        data_dir = tmp_path_factory.mktemp("cifar10-data")
    archive = data_dir / CIFAR10_ARCHIVE.name
    if not archive.exists():
        try:
            archive.symlink_to(CIFAR10_ARCHIVE)
        except OSError:
            shutil.copyfile(CIFAR10_ARCHIVE, archive)
    load_train_arrays("cifar10", data_dir, download=False)  # builds the cache once
    return data_dir


@pytest.fixture(scope="module")
def cifar10_or_stand_in(request, tmp_path_factory) -> dict:
    """Run-config pointing at the CIFAR-10 copy, else at a generated stand-in."""
    if CIFAR10_ARCHIVE.is_file():
        return {
            "dataset": "cifar10",
            "data-dir": str(request.getfixturevalue("cifar10_dir")),
        }
    from tests.helpers import write_learnable_imagefolder

    root = write_learnable_imagefolder(tmp_path_factory.mktemp("stand-in"), 10, 200)
    return {"dataset": "imagefolder", "data-dir": str(root)}


@pytest.fixture
def isolated_caches(tmp_path_factory, monkeypatch):
    """No test writes to ~/.cache or sees another test's memoised client data."""
    from common import data as client_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    client_data.clear_cache()
    yield
    client_data.clear_cache()
