"""Lighter messages (run-config ``transfer``): encodings, validation, bytes, rounds.

- :mod:`common.transfer` round trips: fp32 unchanged, fp16 within half precision
  (finite values clipped, non-finite kept), top-k keeps exactly the k largest
  magnitudes and rebuilds exactly;
- malformed sparse replies are rejected by MH-pFedHN with nothing changed, and a
  good one acts exactly like its dense equivalent;
- bytes on the wire: fp16 halves theta and delta, top-k sends about ``2 f`` of
  the float32 delta;
- in-process rounds with the real ClientApp train under fp16 and top-k.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType, RecordDict

from common import protocol as P
from common.config import ConfigError, load_run_config
from common.transfer import (
    FP16_MAX,
    decode_dense,
    decode_update,
    encode_dense,
    encode_update,
    topk_count,
)
from server_app.engine.costs import payload_bytes
from server_app.engine.registry import ClientInfo, ClientRegistry
from server_app.engine.replies import ReplyCheck
from server_app.strategies.mh_pfedhn import MHPFedHN
from server_app.strategies.mh_pfedhngd import GLOBAL
from tests.helpers import (
    apply,
    assert_same,
    base_config,
    registry,
    reply,
    run,
    snapshot,
    write_learnable_imagefolder,
)

RNG = np.random.default_rng(0)


# -- encodings ------------------------------------------------------------------------
def test_fp32_sends_the_vector_unchanged():
    x = RNG.normal(size=100).astype(np.float32)
    assert encode_dense(x, "fp32") is x
    assert encode_dense(x, "topk") is x  # top-k sends theta down as float32
    arrays = encode_update(x, P.DELTA, "fp32")
    assert list(arrays) == [P.DELTA] and arrays[P.DELTA].dtype == np.float32
    assert np.array_equal(decode_update(arrays, P.DELTA, 100, "fp32"), x)


def test_fp16_round_trip_is_within_half_precision():
    # Magnitudes from 1e-6 (float16 subnormals) to 1e4.
    x = (RNG.normal(size=2000) * 10 ** RNG.uniform(-6, 4, 2000)).astype(np.float32)
    wire = encode_dense(x, "fp16")
    assert wire.dtype == np.float16 and wire.shape == x.shape
    back = decode_dense(wire)
    assert back.dtype == np.float32
    # Round to nearest: half an ulp, 2**-11 relative (normal), 2**-25 absolute.
    np.testing.assert_allclose(back, x, rtol=2**-11, atol=2**-25)
    arrays = encode_update(x, P.GLOBAL_DELTA, "fp16")
    assert arrays[P.GLOBAL_DELTA].dtype == np.float16
    update = decode_update(arrays, P.GLOBAL_DELTA, x.size, "fp16")
    assert update.dtype == np.float32 and np.array_equal(update, back)


def test_fp16_clips_finite_values_and_keeps_non_finite_ones():
    x = np.array([1e6, -7e4, 65519.0, 1.5, np.inf, -np.inf, np.nan], np.float32)
    wire = encode_dense(x, "fp16")
    assert wire[:4].tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, 1.5]
    assert np.isposinf(wire[4]) and np.isneginf(wire[5]) and np.isnan(wire[6])


def test_topk_count():
    assert topk_count(70, 0.1) == 7  # not 8: 0.1 * 70 is 7.000000000000001
    assert topk_count(50, 0.1) == 5
    assert topk_count(3, 0.01) == 1  # at least one entry
    assert topk_count(11, 0.5) == 6
    assert topk_count(10, 1.0) == 10
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        topk_count(10, 0.0)


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_the_k_largest_magnitudes(fraction):
    x = RNG.normal(size=1003).astype(np.float32)
    arrays = encode_update(x, P.DELTA, "topk", fraction)
    assert set(arrays) == {P.DELTA_INDICES, P.DELTA_VALUES}
    indices, values = arrays[P.DELTA_INDICES], arrays[P.DELTA_VALUES]
    k = topk_count(x.size, fraction)
    assert indices.dtype == np.int32 and values.dtype == np.float32
    assert indices.shape == values.shape == (k,)
    assert (np.diff(indices) > 0).all() and indices[0] >= 0 and indices[-1] < x.size
    assert np.array_equal(values, x[indices])
    rest = np.delete(np.abs(x), indices)
    assert rest.size == 0 or np.abs(values).min() >= rest.max()
    dense = decode_update(arrays, P.DELTA, x.size, "topk", fraction)
    expected = np.zeros_like(x)
    expected[indices] = x[indices]
    assert dense.dtype == np.float32 and np.array_equal(dense, expected)


def test_topk_sends_a_nan_so_that_the_server_rejects_it():
    x = np.ones(20, np.float32)
    x[3] = np.nan
    arrays = encode_update(x, P.DELTA, "topk", 0.1)
    assert 3 in arrays[P.DELTA_INDICES]
    with pytest.raises(ValueError, match="NaN or Inf"):
        decode_update(arrays, P.DELTA, 20, "topk", 0.1)


# -- what the receiver refuses -------------------------------------------------------
K, FRACTION = 50, 0.2  # k = 10


def sparse(indices, values=None, index_dtype=np.int32, value_dtype=np.float32):
    values = np.ones(len(indices)) if values is None else values
    return {
        P.DELTA_INDICES: np.asarray(indices, index_dtype),
        P.DELTA_VALUES: np.asarray(values, value_dtype),
    }


INDICES, VALUES = np.arange(2, dtype=np.int32), np.ones(2, np.float32)
MALFORMED_SPARSE = {
    "no indices": ({P.DELTA_VALUES: VALUES}, "no array 'delta-indices'"),
    "no values": ({P.DELTA_INDICES: INDICES}, "no array 'delta-values'"),
    "dense delta": ({P.DELTA: np.zeros(K, np.float32)}, "no array 'delta-indices'"),
    "float indices": (sparse([1, 2], index_dtype=np.float32), "expected integers"),
    "integer values": (sparse([1, 2], value_dtype=np.int32), "floating"),
    "2-D indices": (
        {P.DELTA_INDICES: INDICES.reshape(2, 1), P.DELTA_VALUES: VALUES},
        "must be 1-D",
    ),
    "length mismatch": (sparse([1, 2, 3], [1.0, 1.0]), "differ in length"),
    "more than k": (sparse(range(11)), r"11 sparse entries .* at most k = 10"),
    "negative index": (sparse([-1, 2]), r"outside \[0, 50\)"),
    "index = K": (sparse([3, K]), r"outside \[0, 50\)"),
    "duplicate": (sparse([3, 3]), "duplicate"),
    "unsorted": (sparse([4, 3]), "not sorted"),
    "NaN value": (sparse([1, 2], [np.nan, 1.0]), "NaN or Inf"),
    "Inf value": (sparse([1, 2], [1.0, -np.inf]), "NaN or Inf"),
}

MALFORMED_FP16 = {
    "missing": ({}, "no array 'delta'"),
    "sparse instead": (sparse([1, 2]), "no array 'delta'"),
    "wrong length": ({P.DELTA: np.zeros(K - 1, np.float16)}, r"expected shape \(50,\)"),
    "integer": ({P.DELTA: np.zeros(K, np.int16)}, "floating"),
    "Inf": ({P.DELTA: np.full(K, np.inf, np.float16)}, "NaN or Inf"),
}


@pytest.mark.parametrize("case", MALFORMED_SPARSE)
def test_decode_update_refuses_malformed_sparse_updates(case):
    arrays, match = MALFORMED_SPARSE[case]
    with pytest.raises(ValueError, match=match):
        decode_update(arrays, P.DELTA, K, "topk", FRACTION)


@pytest.mark.parametrize("case", MALFORMED_FP16)
def test_decode_update_refuses_malformed_fp16_updates(case):
    arrays, match = MALFORMED_FP16[case]
    with pytest.raises(ValueError, match=match):
        decode_update(arrays, P.DELTA, K, "fp16")


def test_fewer_than_k_sparse_entries_are_accepted():
    dense = decode_update(sparse([], []), P.DELTA, K, "topk", FRACTION)
    assert dense.shape == (K,) and not dense.any()


# -- the server --------------------------------------------------------------------
def hn_config(transfer: str):
    """The run config of :func:`hn_strategy`; the engine's checks read it too."""
    return load_run_config(
        {
            "chunk-size": 16,
            "max-delta-norm": 100.0,
            "transfer": transfer,
            "topk-fraction": FRACTION,
        }
    )


def hn_strategy(transfer: str) -> MHPFedHN:
    strategy = MHPFedHN.from_config(hn_config(transfer))
    strategy.clients = registry()
    strategy.setup(strategy.clients)
    return strategy


@pytest.fixture(scope="module")
def topk_strategy() -> MHPFedHN:
    strategy = hn_strategy("topk")
    strategy.hn_step([("a", torch.ones(K), 1.0)])  # optimizer state to compare
    return strategy


def sparse_reply(arrays: dict[str, np.ndarray]):
    """A well-formed train reply of client 'a' carrying ``arrays``."""
    message = reply(delta=None)
    message.content[P.ARRAYS] = ArrayRecord(
        {key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()}
    )
    return message


HUGE = (sparse(range(10), np.full(10, 40.0)), "max-delta-norm")  # norm 126 > 100


@pytest.mark.parametrize("mode", ["sequential", "mean"])
@pytest.mark.parametrize("case", [*MALFORMED_SPARSE, "norm of the rebuilt delta"])
def test_malformed_sparse_replies_change_nothing(
    topk_strategy, monkeypatch, case, mode
):
    strategy = topk_strategy
    arrays, match = MALFORMED_SPARSE.get(case, HUGE)
    reasons: list[str] = []
    reject = ReplyCheck.reject
    monkeypatch.setattr(
        ReplyCheck, "reject", lambda s, *a: (reasons.append(a[2]), reject(s, *a))
    )
    before = snapshot(strategy)
    check = apply(strategy, sparse_reply(arrays), mode, hn_config("topk"))
    assert check.rejected == 1 and re.search(match, reasons[0]), reasons
    assert_same(before, snapshot(strategy))


def test_a_sparse_reply_acts_exactly_like_its_dense_delta():
    delta = (RNG.normal(size=K) * 0.01).astype(np.float32)
    arrays = encode_update(delta, P.DELTA, "topk", FRACTION)
    dense = decode_update(arrays, P.DELTA, K, "topk", FRACTION)
    sparse_side, dense_side = hn_strategy("topk"), hn_strategy("fp32")
    start = snapshot(dense_side)
    sparse_check = apply(
        sparse_side, sparse_reply(arrays), "sequential", hn_config("topk")
    )
    dense_check = apply(dense_side, reply(delta=dense), "sequential", hn_config("fp32"))
    assert sparse_check.rejected == dense_check.rejected == 0
    assert_same(snapshot(sparse_side), snapshot(dense_side))
    changed = snapshot(dense_side)[0]["embeddings.a"]
    assert not torch.equal(start[0]["embeddings.a"], changed)


def test_other_strategies_refuse_lighter_transfer():
    with pytest.raises(
        ConfigError,
        match=r"'transfer' = 'fp16' is not allowed with strategy 'fedavg'.*"
        r"supported by mh-pfedhn, mh-pfedhngd",
    ):
        load_run_config({"strategy": "fedavg", "transfer": "fp16"})
    assert load_run_config({"strategy": "mh-pfedhngd", "transfer": "topk"})


# -- bytes on the wire ----------------------------------------------------------------
def test_fp16_halves_and_topk_shrinks_the_bytes():
    size = 20_000
    client = ClientInfo("big", 1, size, 10, 5, 10, 3)
    down, up = {}, {}
    delta = RNG.normal(size=size).astype(np.float32)
    encodings = [("fp32", 1.0), ("fp16", 1.0), ("topk", 0.1), ("topk", 0.01)]
    for transfer, fraction in encodings:
        cfg = {"chunk-size": 1000, "transfer": transfer, "topk-fraction": fraction}
        strategy = MHPFedHN.from_config(load_run_config(cfg))
        strategy.clients = ClientRegistry([client])
        strategy.setup(strategy.clients)
        down[transfer, fraction] = payload_bytes(strategy.train_payload(client, 1))
        arrays = encode_update(delta, P.DELTA, transfer, fraction)
        record = ArrayRecord({key: Array(value) for key, value in arrays.items()})
        up[transfer, fraction] = payload_bytes(RecordDict({P.ARRAYS: record}))
    assert down["fp32", 1.0] == pytest.approx(4 * size, rel=0.01)
    assert down["fp16", 1.0] / down["fp32", 1.0] == pytest.approx(0.5, rel=0.01)
    assert up["fp16", 1.0] / up["fp32", 1.0] == pytest.approx(0.5, rel=0.01)
    for fraction in (0.1, 0.01):
        assert down["topk", fraction] == down["fp32", 1.0]
        ratio = up["topk", fraction] / up["fp32", 1.0]
        assert ratio == pytest.approx(2 * fraction, abs=0.005)  # + array headers


# -- rounds with the real ClientApp ----------------------------------------------------
#: Two rounds of two CNN clients with a small hypernetwork (fast on a CPU).
ROUNDS = {
    "models": "cnn",
    "num-server-rounds": 2,
    "topk-fraction": 0.1,
    "hidden-dim": 8,
    "embed-dim": 8,
    "checkpoint-every": 0,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("transfer"), 4, 16)


@pytest.fixture(scope="module")
def fp32_bytes(folder, tmp_path_factory):
    """Per-round bytes of the same run with float32 messages."""
    config = base_config(folder, tmp_path_factory.mktemp("fp32"), **ROUNDS)
    _, _, _, rows = run(config, 2)
    return [(r["bytes_down"], r["bytes_up"]) for r in rows]


@pytest.mark.parametrize(
    ("strategy_name", "transfer"),
    [("mh-pfedhn", "fp16"), ("mh-pfedhn", "topk"), ("mh-pfedhngd", "topk")],
)
def test_rounds_train_with_lighter_messages(
    folder, tmp_path, fp32_bytes, strategy_name, transfer
):
    config = base_config(
        folder, tmp_path, strategy=strategy_name, transfer=transfer, **ROUNDS
    )
    strategy, grid, _, rows = run(config, 2)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["rejected_replies"] == 0 for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    gd = strategy_name == "mh-pfedhngd"
    hn = strategy.hn
    names = ["client-0", "client-1"] + ([GLOBAL] if gd else [])
    for name in names:  # one Adam step per round on every embedding
        assert strategy.optimizer.state[hn.embeddings[name]]["step"] == 2, name

    wire = np.float16 if transfer == "fp16" else np.float32
    kinds = {MessageType.TRAIN, MessageType.EVALUATE}
    sent = [m for m in grid.sent if m.metadata.message_type in kinds]
    assert {m.metadata.message_type for m in sent} == kinds
    for message in sent:  # train and evaluation messages alike
        for key, array in message.content[P.ARRAYS].items():
            assert array.numpy().dtype == wire, (message.metadata.message_type, key)
    deltas = [P.DELTA] + ([P.GLOBAL_DELTA] if gd else [])
    train_replies = [r for r in grid.answered if P.ARRAYS in r.content]
    assert len(train_replies) == 4
    for message in train_replies:
        arrays = message.content[P.ARRAYS]
        if transfer == "fp16":
            assert sorted(arrays) == sorted(deltas)
            assert all(arrays[key].numpy().dtype == np.float16 for key in deltas)
        else:
            expected = [name for key in deltas for name in P.sparse_keys(key)]
            assert sorted(arrays) == sorted(expected)

    if not gd:  # the same schedule as the float32 run
        for (down, up), (down32, up32) in zip(
            [(r["bytes_down"], r["bytes_up"]) for r in rows], fp32_bytes, strict=True
        ):
            if transfer == "fp16":
                assert down / down32 == pytest.approx(0.5, rel=0.01)
                assert up / up32 == pytest.approx(0.5, rel=0.01)
            else:
                assert down == down32
                assert up / up32 == pytest.approx(0.2, abs=0.005)
