"""Checkpoints: an interrupted and resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from common.config import load_run_config
from server_app.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT,
    CheckpointError,
    check_compatible,
    checkpoint_path,
    load_optimizer,
    pack_optimizer,
    read_checkpoint,
    write_checkpoint,
)
from server_app.engine.loop import Engine
from server_app.results import RunResults
from server_app.strategies import STRATEGIES
from tests.helpers import base_config, write_learnable_imagefolder
from tests.inprocess_grid import InProcessGrid

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

    class Crashing(Engine):
        def train_round(self, grid, server_round, evaluate_first):
            if server_round == crash_at:
                raise Crash(f"killed in round {server_round}")
            return super().train_round(grid, server_round, evaluate_first)

    strategy = STRATEGIES[cfg.strategy].from_config(cfg)
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
        Crashing(strategy, cfg).start(grid, results, checkpoint)
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
    # A key the checkpoint predates counts as its default: the run behaved so;
    # a key that is no longer in the schema is not compared.
    older = read_checkpoint(run_dir / CHECKPOINT_FILE)
    del older["config"]["hn-order"]
    older["config"]["a-retired-key"] = True
    cfg = load_run_config(config | {"resume-from": str(run_dir)})
    check_compatible(older, cfg, run_dir)
    with pytest.raises(CheckpointError, match=r"hn-order \(checkpoint 'random'"):
        check_compatible(
            older, load_run_config(config | {"hn-order": "by-size"}), run_dir
        )
    # A run name inside results-dir is enough.
    assert checkpoint_path("a", str(tmp_path)) == run_dir / CHECKPOINT_FILE
    (run_dir / CHECKPOINT_FILE).write_bytes(good[: len(good) // 2])
    refused(r"cannot be read \(\w+\): it is truncated or not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint_path(str(tmp_path / "nowhere"))
    assert (run_dir / "metrics.jsonl").read_text() == metrics


class LateGrid(InProcessGrid):
    """Node 1001 (``client-1``) connects once round 1's training has begun."""

    def get_node_ids(self):
        started = any(m.metadata.message_type == MessageType.TRAIN for m in self.sent)
        return [n for n in self.contexts if started or n != 1001]


def named_optimizer_state(strategy) -> dict[str, dict]:
    names = {id(p): n for n, p in strategy.hn.named_parameters()}
    return {names[id(p)]: s for p, s in strategy.optimizer.state.items()}


def test_a_client_that_joined_mid_run_resumes_with_its_own_optimizer_state(
    folder, tmp_path
):
    """``client-1`` joins before round 2, so its embedding is the optimizer's last
    parameter; the resumed server registers clients by name (``client-1`` before
    ``client-2``). Its Adam state must still be its own: the resumed run ends with
    the uninterrupted run's optimizer state, name by name, and hypernetwork."""
    config = base_config(folder, tmp_path, models="cnn")
    config |= {"num-server-rounds": 3, "checkpoint-every": 2}
    whole, _, _ = start(config | {"run-name": "whole"}, grid=LateGrid(config, 3))
    assert list(whole.hn.embeddings) == ["client-0", "client-2", "client-1"]

    cut = config | {"run-name": "cut"}
    clients = LateGrid(cut, 3)
    with pytest.raises(Crash):
        start(cut, crash_at=3, grid=clients)
    resumed, _, _ = start(config | {"resume-from": "cut"}, grid=clients)
    assert list(resumed.hn.embeddings) == ["client-0", "client-1", "client-2"]

    expected, got = named_optimizer_state(whole), named_optimizer_state(resumed)
    assert got.keys() == expected.keys()
    for name, state in expected.items():
        assert state.keys() == got[name].keys(), name
        for key, value in state.items():
            assert torch.equal(got[name][key], value), f"{name} {key}"
    whole_hn, resumed_hn = whole.hn.state_dict(), resumed.hn.state_dict()
    assert whole_hn.keys() == resumed_hn.keys()
    for key, value in whole_hn.items():
        assert torch.equal(resumed_hn[key], value), key


def test_optimizer_state_loads_by_name_and_refuses_other_parameters():
    """Saved by name, the state lands on the same-named parameters whatever the
    registration order; a changed chunk count is refused, naming the parameters."""
    cfg = load_run_config({"chunk-size": 8, "embed-dim": 4, "hidden-dim": 4})
    source = STRATEGIES["mh-pfedhn"].from_config(cfg)
    for name, size in [("a", 20), ("c", 20), ("b", 30)]:
        source.register(name, size)
    for name in ("a", "c", "b"):
        source.hn_step([(name, torch.randn(source.hn.num_params[name]), 1.0)])
    saved = pack_optimizer(source.optimizer, source.hn)

    target = STRATEGIES["mh-pfedhn"].from_config(cfg)
    for name, size in [("a", 20), ("b", 30), ("c", 20)]:
        target.register(name, size)
    load_optimizer(target.optimizer, target.hn, saved)
    assert named_optimizer_state(target).keys() == named_optimizer_state(source).keys()
    for name, state in named_optimizer_state(source).items():
        for key, value in state.items():
            assert torch.equal(named_optimizer_state(target)[name][key], value)

    other = STRATEGIES["mh-pfedhn"].from_config(cfg)
    for name, size in [("a", 20), ("b", 40), ("c", 20)]:  # b: 5 chunks, not 4
        other.register(name, size)
    with pytest.raises(
        CheckpointError, match=r"not in the checkpoint: heads\.5\."
    ) as err:
        load_optimizer(other.optimizer, other.hn, saved)
    assert "only in the checkpoint: heads.4." in str(err.value)
    assert "embeddings.b has shape (5, 4), its saved state (4, 4)" in str(err.value)
    positional = {"__state_dict__": source.optimizer.state_dict()}
    with pytest.raises(CheckpointError, match="not keyed by parameter name"):
        load_optimizer(target.optimizer, target.hn, positional)


def test_a_checkpoint_of_the_positional_format_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    write_checkpoint(path, {"format": 1, "round": 1})
    with pytest.raises(CheckpointError, match="format 1; this version reads only"):
        read_checkpoint(path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    write_checkpoint(path, {"format": FORMAT, "round": 1})

    def dies(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, {"format": FORMAT, "round": 2})
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


def test_a_resumed_simulation_restores_client_state_from_client_state_dir(
    folder, tmp_path
):
    """A resumed simulation is a new Flower run: its clients start empty. With
    run-config ``client-state-dir`` they restore their state (``local``: the
    personal model and BatchNorm statistics) as of the checkpoint's round, also
    when the lost run went on past it, and the run ends where an uninterrupted
    one ends; without it the numbers differ."""
    config = base_config(folder, tmp_path, strategy="local", models="resnet10")
    config |= {"num-server-rounds": 3, "checkpoint-every": 2}
    _, whole, _ = start(config | {"run-name": "whole"}, num_nodes=2)

    def cut(name: str, **more) -> dict:
        cut = config | {"run-name": name, **more}
        with pytest.raises(Crash):
            start(cut, crash_at=3, grid=InProcessGrid(cut, 2, run_id=2))
        return cut | {"resume-from": name}

    def resume(config: dict, run_id: int) -> RunResults:
        return start(config, grid=InProcessGrid(config, 2, run_id=run_id))[1]

    kept = cut("kept", **{"client-state-dir": str(tmp_path / "state")})
    round_2 = (tmp_path / "kept" / CHECKPOINT_FILE).read_bytes()
    assert rows(resume(kept, run_id=3)) == rows(whole)
    # As if the resumed server had died after its clients saved round 3 but
    # before its round-3 checkpoint: the next resume repeats round 3.
    (tmp_path / "kept" / CHECKPOINT_FILE).write_bytes(round_2)
    assert rows(resume(kept, run_id=4)) == rows(whole)

    lost = cut("lost")
    assert [r["loss"] for r in rows(resume(lost, run_id=3))] != [
        r["loss"] for r in rows(whole)
    ]


def test_checkpoints_without_the_optimizer_state_resume_with_fresh_moments(
    folder, tmp_path
):
    """``checkpoint-optimizer = false``: no Adam moments on disk (the checkpoint is
    about a third of the size); resuming works and starts Adam afresh."""
    config = base_config(folder, tmp_path, strategy="mh-pfedhn")
    config |= {"num-server-rounds": 2, "checkpoint-every": 1}
    start(config | {"run-name": "full"})
    start(config | {"run-name": "light", "checkpoint-optimizer": False})
    full = torch.load(tmp_path / "full" / CHECKPOINT_FILE, weights_only=True)
    light = torch.load(tmp_path / "light" / CHECKPOINT_FILE, weights_only=True)
    assert full["state"]["optimizer"] is not None
    assert light["state"]["optimizer"] is None
    size = (tmp_path / "light" / CHECKPOINT_FILE).stat().st_size
    assert size < 0.4 * (tmp_path / "full" / CHECKPOINT_FILE).stat().st_size
    resumed, _, _ = start(
        config
        | {"checkpoint-optimizer": False, "num-server-rounds": 3}
        | {"resume-from": str(tmp_path / "light")}
    )
    # Adam restarted at round 3: the extractor took that round's 3 steps only
    # (9 in an uninterrupted run), each client's embedding 1.
    steps = {float(s["step"]) for s in resumed.optimizer.state.values()}
    assert steps == {1.0, 3.0}
