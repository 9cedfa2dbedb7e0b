"""Baselines that share a vector or nothing: local, fedavg, lg-fedavg.

Aggregation math on tiny inputs, then each strategy for a few rounds with the
real ClientApp through the in-process grid.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from common import protocol as P
from common.config import ConfigError, load_run_config
from server_app.engine.registry import ClientInfo
from server_app.strategies.aggregate import class_mean, weighted_mean
from server_app.strategies.averaging import SharedVectorMismatch
from server_app.strategies.fedavg import FedAvg
from server_app.strategies.lg_fedavg import LGFedAvg
from tests.helpers import base_config, run, validated, write_learnable_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 24)


def test_weighted_mean_by_hand():
    a, b = np.array([1.0, 2.0]), np.array([4.0, 8.0])
    np.testing.assert_allclose(weighted_mean([a, b], [1, 2]), [3.0, 6.0])
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_mean([a, np.zeros(3)], [1, 1])
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_mean([a, b], [0, 0])


def test_class_mean_skips_clients_without_the_class():
    t1 = np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]])
    t2 = np.array([[3.0, 3.0], [0.0, 0.0], [7.0, 7.0]])
    c1, c2 = np.array([1, 3, 0]), np.array([3, 0, 0])
    means, present = class_mean([t1, t2], [c1, c2])
    np.testing.assert_allclose(means, [[2.0, 2.0], [5.0, 5.0], [0.0, 0.0]])
    assert present.tolist() == [True, True, False]
    weighted, _ = class_mean([t1, t2], [c1, c2], weighted=True)
    np.testing.assert_allclose(weighted[0], [2.5, 2.5])  # (1*1 + 3*3) / 4


def test_homogeneous_strategies_refuse_mixed_models():
    for strategy in ("fedavg", "pfedhn"):
        with pytest.raises(ConfigError, match=f"'models' = 'cnn,vgg8'.*'{strategy}'"):
            load_run_config({"strategy": strategy, "models": "cnn,vgg8"})
    assert load_run_config({"strategy": "fedavg", "models": "vgg8"})


def reply(**arrays) -> RecordDict:
    """A train reply with ``arrays`` and 1 example unless ``n`` says otherwise."""
    n = arrays.pop("n", 1)
    return RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.LOSS: 0.0, P.SECONDS: 0.0}),
        }
    )


def info(name: str) -> ClientInfo:
    return ClientInfo(name, 1, 3, 1, 1, 2, 3)


def test_averaging_by_hand():
    """FedAvg: w - sum n_i d_i / sum n_i; LG-FedAvg: the weighted mean head;
    a malformed reply is skipped without touching the vector."""
    avg = FedAvg.from_config(load_run_config({"strategy": "fedavg"}))
    avg.vector = np.array([1.0, 1.0, 1.0], np.float32)
    avg.apply_train_replies(
        1,
        validated(
            avg,
            [
                (info("a"), reply(delta=np.float32([1, 0, 0]), n=1)),
                (info("b"), reply(delta=np.float32([0, 0, 3]), n=3)),
                (info("c"), reply(delta=np.float32([0, 1]), n=5)),  # wrong length
                (info("d"), reply(delta=np.float32([np.nan, 0, 0]), n=5)),
            ],
        )[0],
    )
    np.testing.assert_allclose(avg.vector, [0.75, 1.0, -1.25])
    lg = LGFedAvg.from_config(load_run_config({"strategy": "lg-fedavg"}))
    lg.apply_train_replies(
        1,
        validated(
            lg,
            [
                (info("a"), reply(head=np.float32([2, 0]), n=1)),
                (info("b"), reply(head=np.float32([0, 4]), n=1)),
            ],
        )[0],
    )
    np.testing.assert_allclose(lg.vector, [1.0, 2.0])


def test_local_learns_and_keeps_each_model(folder, tmp_path):
    config = base_config(folder, tmp_path, strategy="local", models="cnn,vgg8")
    strategy, grid, _, rows = run(config | {"run-name": "local"}, 4)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] or rows[-1]["accuracy"] > 0.5
    # Train messages carry no arrays; every node keeps its own parameters.
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(not m.content.array_records.get("arrays") for m in train)
    assert all("model-params" in c.state for c in grid.contexts.values())
    assert all(r["bytes_down"] == 0 for r in rows)


def train_messages(messages, server_round: int, node: str = "dst_node_id") -> dict:
    """The TRAIN messages of one round by destination node (replies: ``node =
    "src_node_id"``, by the node that answered)."""
    return {
        getattr(m.metadata, node): m
        for m in messages
        if m.metadata.message_type == "train"
        and m.metadata.group_id == str(server_round)
    }


def replies_of(grid, server_round: int) -> dict:
    return train_messages(grid.answered, server_round, node="src_node_id")


def arrays_of(message) -> dict[str, np.ndarray]:
    records = message.content.array_records
    return {k: v.numpy() for k, v in records["arrays"].items()} if records else {}


def by_examples(replies: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The example-weighted and the plain mean of the replies' ``key`` arrays, in
    float64, computed here independently of the strategy."""
    vectors = np.stack([arrays_of(m)[key].astype(np.float64) for m in replies.values()])
    n = np.array([m.content["metrics"][P.NUM_EXAMPLES] for m in replies.values()])
    assert len(set(n.tolist())) > 1, "equal example counts would not test weights"
    return (n[:, None] * vectors).sum(0) / n.sum(), vectors.mean(0)


def test_fedavg_global_model_is_the_weighted_mean(folder, tmp_path):
    """Each round: w <- w - sum_i n_i d_i / sum_i n_i, with n_i the examples client
    i trained on (its reply's num-examples), not the plain mean."""
    config = base_config(folder, tmp_path, strategy="fedavg", models="cnn")
    config["num-server-rounds"] = 2
    strategy, grid, _, rows = run(config | {"run-name": "avg"}, 3)
    assert strategy.vector is not None and len(strategy.vector) == 234006 - 650 + 390
    after = {}
    for server_round in (1, 2):
        sent = train_messages(grid.sent, server_round)
        replies = replies_of(grid, server_round)
        assert len(sent) == len(replies) == 3
        thetas = [arrays_of(m)["theta"] for m in sent.values()]
        assert all(np.array_equal(thetas[0], t) for t in thetas[1:])  # one model
        weighted, plain = by_examples(replies, "delta")
        after[server_round] = thetas[0] - weighted
        assert np.abs(weighted - plain).max() > 1e-4  # the weights matter here
    round2 = arrays_of(next(iter(train_messages(grid.sent, 2).values())))["theta"]
    np.testing.assert_allclose(round2, after[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(strategy.vector, after[2], rtol=0, atol=1e-6)
    assert rows[-1]["bytes_up"] > 0


def test_lg_fedavg_shares_only_the_head(folder, tmp_path):
    """Only the 390-value head (Linear(64, 6)) travels, both ways; the server's head
    is the example-weighted mean of the uploaded heads; extractors stay private."""
    config = base_config(folder, tmp_path, strategy="lg-fedavg", models="cnn,resnet10")
    strategy, grid, _, rows = run(config | {"run-name": "lg"}, 4)
    head = 64 * 6 + 6
    assert strategy.vector.shape == (head,) and len(rows) == 3
    # Round 1: the server has no head yet and sends nothing.
    assert all(not arrays_of(m) for m in train_messages(grid.sent, 1).values())
    heads = {}
    for server_round in (1, 2, 3):
        replies = replies_of(grid, server_round)
        assert len(replies) == 4
        for reply in replies.values():
            assert arrays_of(reply).keys() == {"head"}
            assert arrays_of(reply)["head"].shape == (head,)
        heads[server_round], plain = by_examples(replies, "head")
        assert np.abs(heads[server_round] - plain).max() > 1e-6
        if server_round > 1:  # sent: the mean of the previous round's heads
            for message in train_messages(grid.sent, server_round).values():
                assert arrays_of(message).keys() == {"head"}
                np.testing.assert_allclose(
                    arrays_of(message)["head"], heads[server_round - 1], atol=1e-6
                )
    np.testing.assert_allclose(strategy.vector, heads[3], rtol=0, atol=1e-6)
    evaluate = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert evaluate and all(arrays_of(m).keys() == {"head"} for m in evaluate)
    # Each client keeps its whole model: the uploaded head is the model's last
    # layer, the rest (the extractor) never left the node and is not averaged.
    kept = {
        node: context.state["model-params"]["theta"].numpy()
        for node, context in grid.contexts.items()
    }
    last = replies_of(grid, 3)
    for node, theta in kept.items():
        assert np.array_equal(theta[-head:], arrays_of(last[node])["head"])
    cnn_a, cnn_b = (kept[node][:-head] for node in sorted(kept)[:2])
    assert cnn_a.size == 234006 - 650 and not np.allclose(cnn_a, cnn_b)


def test_lg_fedavg_refuses_heads_of_different_sizes(folder, tmp_path):
    config = base_config(
        folder, tmp_path, strategy="lg-fedavg", models="cnn,mobilenetv2"
    )
    with pytest.raises(SharedVectorMismatch, match="heads differ in size"):
        run(config | {"run-name": "bad", "num-server-rounds": 1}, 2)
