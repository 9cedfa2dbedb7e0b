"""Checkpoints: an interrupted and resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import load_run_config
from server_app.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    check_compatible,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from server_app.results import RunResults
from server_app.strategies import STRATEGIES
from tests.inprocess_grid import InProcessGrid
from tests.test_e2e import write_learnable_imagefolder
from tests.test_strategy import base_config

METRIC_KEYS = ("round", "phase", "accuracy", "loss", "client_accuracy", "train_loss")


class Crash(RuntimeError):
    """Stands for the ServerApp process dying."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 24)


def start(
    config: dict,
    num_nodes: int = 3,
    crash_at: int | None = None,
    grid: InProcessGrid | None = None,
):
    """Run the strategy the way the ServerApp does; ``crash_at`` kills it as
    round ``crash_at`` begins. Passing the ``grid`` of an earlier run keeps its
    clients (and their private state) alive, as SuperNodes outlive a server."""
    cfg = load_run_config(config)
    base = STRATEGIES[cfg.strategy]

    class Crashing(base):
        def train_phase(self, grid, server_round):
            if server_round == crash_at:
                raise Crash(f"killed in round {server_round}")
            return super().train_phase(grid, server_round)

    Crashing.name = base.name
    strategy = Crashing(cfg)
    checkpoint = None
    if cfg.resume_from:
        path = checkpoint_path(cfg.resume_from, cfg.results_dir)
        checkpoint = read_checkpoint(path)
        check_compatible(checkpoint, cfg, path)
        results = RunResults.reopen(
            path.parent, cfg, checkpoint["metrics"], checkpoint["round"]
        )
    else:
        results = RunResults.create(cfg)
    try:
        grid = grid or InProcessGrid(config, num_nodes)
        strategy.start(grid, results, checkpoint)
    finally:
        results.finish()
    return strategy, results, grid


def rows(results: RunResults) -> list[dict]:
    lines = (results.path / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(x).get(k) for k in METRIC_KEYS} for x in lines]


@pytest.mark.parametrize(
    "variant",
    [
        {"strategy": "mh-pfedhn"},
        {"strategy": "mh-pfedhn", "hn-update": "mean"},
        {"strategy": "mh-pfedhngd"},
    ],
    ids=["sequential", "mean", "gd"],
)
def test_interrupted_and_resumed_equals_uninterrupted(folder, tmp_path, variant):
    config = base_config(folder, tmp_path, **variant)
    config |= {"num-server-rounds": 3, "checkpoint-every": 2}
    whole, whole_results, _ = start(config | {"run-name": "whole"})

    with pytest.raises(Crash):
        start(config | {"run-name": "cut"}, crash_at=3)
    run_dir = tmp_path / "cut"
    saved = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    assert saved["round"] == 2
    resumed, resumed_results, _ = start(config | {"resume-from": str(run_dir)})

    assert resumed_results.path == run_dir
    assert rows(resumed_results) == rows(whole_results)
    assert [r["round"] for r in rows(resumed_results)] == [1, 2, 3]
    # One machine.json entry per start: rounds 1-2, then 3 after the resume.
    starts = json.loads((run_dir / "machine.json").read_text())
    assert [s["from_round"] for s in starts] == [0, 2]
    whole_state, resumed_state = whole.hn.state_dict(), resumed.hn.state_dict()
    assert whole_state.keys() == resumed_state.keys()
    diff = max(
        float((value - resumed_state[key]).abs().max())
        for key, value in whole_state.items()
    )
    print(f"max abs hypernetwork difference ({variant}): {diff}")
    assert diff <= 1e-6


def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(folder, tmp_path):
    config = base_config(folder, tmp_path, **{"run-name": "a", "num-server-rounds": 2})
    config["checkpoint-every"] = 1
    start(config)
    run_dir = tmp_path / "a"
    good = (run_dir / CHECKPOINT_FILE).read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()

    def refused(match: str, **changes) -> None:
        cfg = load_run_config(config | {"resume-from": str(run_dir), **changes})
        with pytest.raises(CheckpointError, match=match):
            path = checkpoint_path(cfg.resume_from, cfg.results_dir)
            check_compatible(read_checkpoint(path), cfg, path)

    refused("written by strategy 'mh-pfedhn'; this run uses 'mh-pfedhngd'",
            strategy="mh-pfedhngd")  # fmt: skip
    refused(r"incompatible run config: seed \(checkpoint 42, now 7\)", seed=7)
    refused("at round 2, beyond num-server-rounds = 1", **{"num-server-rounds": 1})
    # A run name inside results-dir is enough.
    assert checkpoint_path("a", str(tmp_path)) == run_dir / CHECKPOINT_FILE
    (run_dir / CHECKPOINT_FILE).write_bytes(good[: len(good) // 2])
    refused("cannot be read \\(truncated")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint_path(str(tmp_path / "nowhere"))
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    write_checkpoint(path, {"format": 1, "round": 1})

    def dies(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {"format": 1, "round": 2})
    monkeypatch.undo()
    assert read_checkpoint(path)["round"] == 1


def test_more_rounds_after_a_finished_run(folder, tmp_path):
    """A finished run resumes with a larger num-server-rounds."""
    config = base_config(folder, tmp_path, **{"run-name": "f", "num-server-rounds": 2})
    start(config)
    _, results, _ = start(
        config | {"resume-from": str(tmp_path / "f"), "num-server-rounds": 3}
    )
    assert [r["round"] for r in rows(results)] == [1, 2, 3]
    assert Path(results.path / "summary.json").is_file()


BASELINES = sorted(set(STRATEGIES) - {"mh-pfedhn", "mh-pfedhngd"})


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_resumes_exactly(folder, tmp_path, name):
    """Server crash after round 2's checkpoint; the clients live on (as
    SuperNodes do) and the resumed server ends where an uninterrupted run ends."""
    config = base_config(folder, tmp_path, strategy=name, models="cnn")
    config |= {"num-server-rounds": 3, "checkpoint-every": 2, "server-epochs": 3}
    _, whole, _ = start(config | {"run-name": "whole"}, num_nodes=2)
    cut = config | {"run-name": "cut"}
    clients = InProcessGrid(cut, 2)
    with pytest.raises(Crash):
        start(cut, crash_at=3, grid=clients)
    _, resumed, _ = start(config | {"resume-from": "cut"}, grid=clients)
    assert rows(resumed) == rows(whole)
