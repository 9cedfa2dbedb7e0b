"""The server loop with the real ClientApp, through an in-process Grid (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from common import protocol as P
from common.config import load_run_config
from server_app.engine.loop import Engine
from server_app.engine.registry import HandshakeError
from server_app.strategies.mh_pfedhn import MHPFedHN
from tests.helpers import base_config, run, write_learnable_imagefolder
from tests.inprocess_grid import InProcessGrid


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 24)


class SeparateEvaluation(Engine):
    """The same engine, but every evaluation in its own message exchange."""

    def __init__(self, algorithm, cfg):
        super().__init__(algorithm, cfg)
        self.carry.carries = lambda *args: False


@pytest.mark.parametrize(
    ("update", "evaluate_messages"),
    [
        ({"hn-update": "mean"}, 4),
        ({"hn-window": 2}, 8),
        ({"hn-window": 0}, 4),
        ({"hn-window": 2, "models": "resnet10,cnn"}, 8),
    ],
)
def test_carried_evaluation_gives_the_same_numbers(
    folder, tmp_path, update, evaluate_messages
):
    """Evaluation riding on the next round equals its own exchange after the round.

    ``mean`` (everyone trains from the round-start state): clients evaluate the
    received model before training, so only the last round needs EVALUATE
    messages. ``sequential``: the first ``hn-window`` train messages of the next
    round carry it, EVALUATE messages to the other clients go with them, and
    each client evaluates before it trains again: with BatchNorm (``resnet10``) the
    stored statistics read are those of the evaluated model.
    """
    config = base_config(folder, tmp_path, **update)
    _, carried_grid, _, carried = run(config | {"run-name": "a"}, 4)
    _, _, _, separate = run(config | {"run-name": "b"}, 4, engine=SeparateEvaluation)
    keys = [
        "round",
        "accuracy",
        "accuracy_mean",
        "loss",
        "client_accuracy",
        "train_loss",
    ]
    assert [{k: r[k] for k in keys} for r in carried] == [
        {k: r[k] for k in keys} for r in separate
    ]
    sent_types = [m.metadata.message_type for m in carried_grid.sent]
    assert sent_types.count(MessageType.EVALUATE) == evaluate_messages


def test_results_and_batchnorm_state_persist(folder, tmp_path):
    config = base_config(folder, tmp_path, models="resnet10,cnn", **{"run-name": "r"})
    strategy, grid, results, rows = run(config, 2)
    assert [r["round"] for r in rows] == [1, 2, 3]
    clients = json.loads((results.path / "clients.json").read_text())
    # 6 classes: the paper's 10-class counts minus 4 rows (65 values) of the last layer
    assert [c["num_params"] for c in clients] == [347178 - 260, 234006 - 260]
    summary = json.loads((results.path / "summary.json").read_text())
    assert (
        summary["rounds"] == 3 and summary["best_accuracy"] >= summary["final_accuracy"]
    )
    resnet_state = grid.contexts[1000].state
    assert "model-buffers" in resnet_state  # BatchNorm statistics kept by the client
    assert "model-buffers" not in grid.contexts[1001].state  # the CNN has none


def test_fraction_train_samples_seeded_subsets(folder, tmp_path):
    config = base_config(
        folder, tmp_path, **{"fraction-train": 0.5, "run-name": "f", "eval-every": 3}
    )
    _, grid, _, rows = run(config, 4)
    trained = trained_nodes(grid)
    assert all(len(t) == 2 for t in trained.values()) and len(trained) == 3
    assert [r["round"] for r in rows] == [3]
    _, grid2, _, _ = run(config | {"run-name": "f2"}, 4)
    assert trained_nodes(grid2) == trained


def trained_nodes(grid: InProcessGrid) -> dict[int, list[int]]:
    """Round -> sorted node ids that got a train message."""
    rounds: dict[int, list[int]] = {}
    for m in grid.sent:
        if m.metadata.message_type == MessageType.TRAIN:
            rnd = int(m.content[P.CONFIG][P.ROUND])
            rounds.setdefault(rnd, []).append(m.metadata.dst_node_id)
    return {r: sorted(ids) for r, ids in rounds.items()}


def test_missing_data_fails_the_handshake_naming_dataset_and_folder(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    config = {"data-dir": str(empty), "download": False, "results-dir": str(tmp_path)}
    with pytest.raises(HandshakeError, match="node 1000: .*cifar10.*nothing-here"):
        run(config, 2)


def test_two_nodes_claiming_one_name_are_refused(folder, tmp_path):
    config = base_config(folder, tmp_path)
    with pytest.raises(HandshakeError, match="claim the client name 'same'"):
        run(
            config,
            2,
            node_configs={0: {"client-name": "same"}, 1: {"client-name": "same"}},
        )


def test_a_failing_client_does_not_stop_the_round(folder, tmp_path, monkeypatch):
    from client_app.trainers.delta import DeltaTrainer

    original = DeltaTrainer.train

    def flaky(self, content, server_round):
        if self.client.name == "client-1" and server_round == 2:
            raise RuntimeError("disk full")
        return original(self, content, server_round)

    monkeypatch.setattr(DeltaTrainer, "train", flaky)
    _, _, _, rows = run(base_config(folder, tmp_path, **{"run-name": "x"}), 3)
    assert [r["train_clients"] for r in rows] == [3, 2, 3]


@pytest.mark.parametrize("window", [1, 2, 0])
def test_windowed_sequential_round_replays_exactly(folder, tmp_path, window):
    """Client k gets theta after the first max(0, k - W + 1) updates, in order."""
    config = base_config(
        folder, tmp_path, **{"hn-window": window, "num-server-rounds": 1}
    )
    strategy, grid, _, _ = run(config | {"run-name": f"w{window}"}, 4)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    deltas = {
        r.metadata.reply_to_message_id: r.content[P.ARRAYS][P.DELTA].numpy()
        for r in grid.answered
        if P.ARRAYS in r.content
    }
    names = {1000 + i: f"client-{i}" for i in range(4)}
    width = window or len(sent)
    replay = MHPFedHN.from_config(load_run_config(config))
    for name in sorted(names.values()):
        replay.register(name, strategy.hn.num_params[name])
    for j, message in enumerate(sent):
        for k, later in enumerate(sent):
            if max(0, k - width + 1) == j:  # sent when j updates were applied
                theta = later.content[P.ARRAYS][P.THETA].numpy()
                expected = replay.theta(names[later.metadata.dst_node_id])
                assert (theta == expected).all(), (j, k)
        delta = torch.from_numpy(deltas[message.metadata.message_id])
        replay.hn_step([(names[message.metadata.dst_node_id], delta, 1.0)])
    for (key, got), (_, want) in zip(
        strategy.hn.state_dict().items(), replay.hn.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), key


def optimizer_state_by_name(strategy) -> dict[str, dict]:
    names = {id(p): n for n, p in strategy.hn.named_parameters()}
    return {names[id(p)]: s for p, s in strategy.optimizer.state.items()}


def test_min_train_clients_holds_in_sequential_rounds(folder, tmp_path):
    """Sequential rounds honour min-train-clients as mean rounds do: a round with
    fewer usable replies leaves hypernetwork and Adam state as they were."""
    config = base_config(folder, tmp_path, models="cnn", **{"min-train-clients": 3})

    class LosesANode(Engine):
        def admit_new_nodes(self, grid, results):
            if self.progress.current_round == 2:
                grid.contexts.pop(1002, None)
            super().admit_new_nodes(grid, results)

    one, *_ = run(config | {"run-name": "one", "num-server-rounds": 1}, 3)
    two, *_, rows = run(
        config | {"run-name": "two", "num-server-rounds": 2}, 3, engine=LosesANode
    )
    assert rows[-1]["round"] == 2 and rows[-1]["train_clients"] == 2
    want, got = optimizer_state_by_name(one), optimizer_state_by_name(two)
    assert got.keys() == want.keys() and len(want) > 0
    for name, state in want.items():
        for key, value in state.items():
            assert torch.equal(got[name][key], value), f"{name} {key}"
    for key, value in one.hn.state_dict().items():
        assert torch.equal(two.hn.state_dict()[key], value), key

    cfg = config | {"run-name": "ten", "num-server-rounds": 1, "min-train-clients": 10}
    ten, *_ = run(cfg, 3)
    assert not ten.optimizer.state  # three steps taken, all undone
    fresh = MHPFedHN.from_config(load_run_config(cfg))
    fresh.setup(ten.clients)
    for key, value in fresh.hn.state_dict().items():
        assert torch.equal(ten.hn.state_dict()[key], value), key
