"""End to end through real Flower processes: `flwr run` on a simulation SuperLink.

These are the slow tests (each starts Ray and the Flower runtime); they share one
SuperLink per module. CIFAR-10 comes from the JPEG copy in ../shared/data when it
exists; otherwise a small generated image folder with learnable classes stands in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    label_prior_accuracy,
    write_learnable_imagefolder,
    write_learnable_mnist,
)
from tools.superlink import SimulationSuperLink

pytestmark = pytest.mark.e2e

PAPER_K = {"cnn": 234006, "vgg8": 268814, "resnet10": 347178}


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = SimulationSuperLink(tmp_path_factory.mktemp("superlink")).start()
    yield link
    link.stop()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    return write_learnable_imagefolder(tmp_path_factory.mktemp("stand-in"), 10, 200)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_learnable_imagefolder(tmp_path_factory.mktemp("tiny"), 10, 40)


def run_ok(link: SimulationSuperLink, tmp_path: Path, num: int, **config) -> Path:
    """Run and return the results directory, failing with the run's own log."""
    results = tmp_path / "results"
    proc = link.run(
        {"results-dir": str(results), "run-name": "run", **config}, num_supernodes=num
    )
    log = proc.stdout + proc.stderr
    run_dir = results / "run"
    assert proc.returncode == 0, log[-4000:]
    assert (run_dir / "summary.json").is_file(), log[-4000:]
    return run_dir


def test_mh_pfedhn_runs_on_cifar10(superlink, tmp_path, cifar10_or_stand_in):
    """The real dataset through the whole pipeline: results files, one row per
    round for every client, byte and time counts. Learning is shown by the next
    test: with the paper's hn-lr, MH-pFedHN needs about 15 rounds on CIFAR-10 to
    pass 0.5 (docs/results, 50 clients); these 3 rounds measured 0.12, 0.15, 0.25."""
    run_dir = run_ok(
        superlink, tmp_path, 10, **cifar10_or_stand_in, **{"num-server-rounds": 3}
    )
    for name in ["config.json", "clients.json", "metrics.jsonl", "accuracy.png"]:
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-server-rounds"] == 3 and config["strategy"] == "mh-pfedhn"
    clients = json.loads((run_dir / "clients.json").read_text())
    assert sorted(c["name"] for c in clients) == sorted(
        f"client-{i}" for i in range(10)
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r["client_accuracy"]) == {c["name"] for c in clients}
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["round_seconds"] > 0
        assert r["accuracy_mean"] == pytest.approx(
            np.mean(list(r["client_accuracy"].values()))
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_accuracy"] == rows[-1]["accuracy"]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]  # on its way


def test_mh_pfedhn_learns(superlink, tmp_path, stand_in):
    """Personal models beyond the label prior: 10 clients with 2 classes each of a
    learnable 10-class image folder. Clients that learnt only their label prior
    score 0.67 on this partition (0.5 with balanced classes; measured below on
    the same partition); the run measured 0.38, 0.51, then 1.0 from round 3."""
    run_dir = run_ok(
        superlink,
        tmp_path,
        10,
        **{"dataset": "imagefolder", "data-dir": str(stand_in)},
        **{"num-server-rounds": 4},
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    prior = label_prior_accuracy(stand_in, 10)
    assert rows[-1]["accuracy"] >= max(0.9, prior + 0.2), (rows[-1], prior)
    assert min(rows[-1]["client_accuracy"].values()) > prior, rows[-1]


def test_heterogeneous_models_get_exact_sizes_and_heads(
    superlink, tmp_path, tiny_folder
):
    run_dir = run_ok(
        superlink,
        tmp_path,
        5,
        **{
            "dataset": "imagefolder",
            "data-dir": str(tiny_folder),
            "models": "cnn,vgg8,resnet10",
            "num-server-rounds": 1,
            "hn-update": "mean",
        },
    )
    clients = {c["name"]: c for c in json.loads((run_dir / "clients.json").read_text())}
    # 5 clients over 3 models: blocks of 2, 2, 1 by partition id.
    expected = ["cnn", "cnn", "vgg8", "vgg8", "resnet10"]
    for pid, model in enumerate(expected):
        assert clients[f"client-{pid}"]["num_params"] == PAPER_K[model]
    assert len({c["head"] for c in clients.values()}) == 3
    assert clients["client-0"]["head"] == clients["client-1"]["head"] == "77"


def test_bad_config_and_missing_data_stop_before_round_1(superlink, tmp_path):
    results = tmp_path / "results"
    proc = superlink.run(
        {"results-dir": str(results), "client-lr": -1.0}, num_supernodes=2
    )
    assert (
        "run-config key 'client-lr' = -1.0 is not allowed" in proc.stdout + proc.stderr
    )
    assert not results.exists() or not any(results.glob("*/metrics.jsonl"))

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = superlink.run(
        {
            "results-dir": str(results),
            "data-dir": str(empty),
            "download": False,
            "run-name": "missing",
        },
        num_supernodes=2,
    )
    log = proc.stdout + proc.stderr
    assert "handshake failed" in log and "cifar10" in log and str(empty) in log, log[
        -3000:
    ]
    assert not (results / "missing" / "metrics.jsonl").exists()


def test_gd_on_a_one_channel_dataset(superlink, tmp_path):
    data = write_learnable_mnist(tmp_path / "mnist")
    run_dir = run_ok(
        superlink,
        tmp_path,
        4,
        **{
            "strategy": "mh-pfedhngd",
            "dataset": "mnist",
            "data-dir": str(data),
            "models": "cnn,resnet10",
            "num-server-rounds": 2,
        },
    )
    clients = {c["name"]: c for c in json.loads((run_dir / "clients.json").read_text())}
    assert all(c["in_channels"] == 1 for c in clients.values())
    # 1 input channel: the paper's 3-channel counts minus 2 * 9 * 16 first-conv weights.
    assert clients["client-0"]["num_params"] == PAPER_K["cnn"] - 288
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.1
