"""Clients that join after training: only their embeddings (and new heads) fit."""

from __future__ import annotations

import json

import pytest
import torch

from server_app.strategies.mh_pfedhn import HYPERNET_FILE
from tests.helpers import base_config, run, write_learnable_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("novel"), 6, 24)


def test_novel_phase_freezes_the_trained_hypernetwork(folder, tmp_path):
    config = base_config(
        folder,
        tmp_path,
        **{"train-clients": 3, "novel-rounds": 2, "num-server-rounds": 2},
        **{"run-name": "fit"},
    )
    # Client 3 joins later with an architecture no training client has.
    strategy, _, results, rows = run(config, 4, node_configs={3: {"model": "vgg8"}})
    assert [(r["round"], r["phase"]) for r in rows] == [
        (1, "train"), (2, "train"), (2, "novel"), (3, "novel"), (4, "novel")
    ]  # fmt: skip
    assert all(set(r["client_accuracy"]) == {"client-3"} for r in rows[2:])
    assert all("client-3" not in r["client_accuracy"] for r in rows[:2])
    summary = json.loads((results.path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] == rows[1]["accuracy"]
    assert summary["novel_accuracy_before"] == rows[2]["accuracy"]
    assert summary["novel_final_accuracy"] == rows[4]["accuracy"]

    trained = torch.load(results.path / HYPERNET_FILE, weights_only=True)["state"]
    final = strategy.hn.state_dict()
    cnn, vgg = strategy.hn.head_of("client-0"), strategy.hn.head_of("client-3")
    assert cnn != vgg
    for key, value in trained.items():
        changed = not torch.equal(value, final[key])
        moves = key == "embeddings.client-3" or key.startswith(f"heads.{vgg}.")
        assert changed == moves, key


def test_a_separate_run_fits_novel_clients_of_a_saved_hypernetwork(folder, tmp_path):
    first = base_config(folder, tmp_path, **{"train-clients": 3, "run-name": "a"})
    first["num-server-rounds"] = 2
    _, _, trained_run, _ = run(first, 3)
    config = base_config(
        folder,
        tmp_path,
        **{"train-clients": 3, "novel-rounds": 1, "num-server-rounds": 0},
        **{"hypernet-from": str(trained_run.path), "run-name": "b"},
    )
    strategy, _, _, rows = run(config, 4)
    assert [(r["round"], r["phase"]) for r in rows] == [(0, "novel"), (1, "novel")]
    saved = torch.load(trained_run.path / HYPERNET_FILE, weights_only=True)["state"]
    final = strategy.hn.state_dict()
    for key in [k for k in saved if k.startswith(("extractor.", "heads."))]:
        assert torch.equal(saved[key], final[key]), key  # loaded, then frozen
    assert torch.equal(saved["embeddings.client-0"], final["embeddings.client-0"])


def test_hypernet_from_with_other_sizes_is_refused(folder, tmp_path):
    _, _, trained_run, _ = run(
        base_config(folder, tmp_path, **{"run-name": "c", "num-server-rounds": 1}), 2
    )
    config = base_config(
        folder,
        tmp_path,
        **{"hypernet-from": str(trained_run.path), "embed-dim": 32, "run-name": "d"},
    )
    with pytest.raises(ValueError, match="embed-dim, hidden-dim, hidden-layers"):
        run(config, 2)
