"""Every reply is validated before it touches the server state.

A property-based test throws malformed train replies at MH-pFedHN (sequential and
mean paths) and at FedAvg: each is rejected and counted, and the hypernetwork,
optimizer and embeddings (or the global model) stay bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as P
from common.config import load_run_config
from server_app.engine.loop import Engine
from server_app.strategies.fedavg import FedAvg
from server_app.strategies.mh_pfedhn import MHPFedHN
from tests.helpers import (
    NODES,
    SIZES,
    apply,
    assert_same,
    registry,
    reply,
    snapshot,
    validate,
)

#: The run config of :func:`hn_strategy`; the engine's checks read it too.
HN_CONFIG = {"chunk-size": 16, "max-delta-norm": 100.0}


@pytest.fixture(scope="module")
def hn_strategy() -> MHPFedHN:
    strategy = MHPFedHN.from_config(load_run_config(HN_CONFIG))
    strategy.clients = registry()
    strategy.setup(strategy.clients)
    # One real step so that the optimizer has state to compare.
    strategy.hn_step([("a", torch.ones(50), 1.0)])
    return strategy


def bad_delta(size: int):
    """Deltas that must be refused: wrong length/shape/dtype, NaN/Inf, huge."""
    wrong_length = (
        st.integers(0, 200)
        .filter(lambda n: n != size)
        .map(lambda n: np.zeros(n, np.float32))
    )
    with_nonfinite = st.tuples(
        st.integers(0, size - 1), st.sampled_from([np.nan, np.inf, -np.inf])
    ).map(lambda t: np.where(np.arange(size) == t[0], t[1], 0.0).astype(np.float32))
    huge = st.floats(15.0, 1e30).map(lambda v: np.full(size, v, np.float32))
    return st.one_of(
        wrong_length,
        with_nonfinite,
        huge,  # norm >= 15 * sqrt(50) > max-delta-norm = 100
        st.just(np.zeros((size, 1), np.float32)),
        st.just(np.zeros(size, np.int64)),
        st.just(None),  # no arrays record at all
    )


bad_metrics = st.one_of(
    st.just({}),
    st.just({P.LOSS: 1.0, P.SECONDS: 0.1}),
    st.sampled_from([P.NUM_EXAMPLES, P.LOSS, P.SECONDS]).flatmap(
        lambda key: st.sampled_from([-1.0, float("nan"), float("inf")]).map(
            lambda v: {P.NUM_EXAMPLES: 10, P.LOSS: 1.0, P.SECONDS: 0.1, key: v}
        )
    ),
)

malformed = st.one_of(
    bad_delta(SIZES["a"]).map(lambda d: reply(delta=d)),
    bad_metrics.map(lambda m: reply(metrics=m)),
    st.just(reply(error=True)),
    st.just(reply(name="ghost", node=99)),  # unknown node
    st.just(reply(name="a", claimed="b")),  # a's node claims b's name
    st.just(reply(name="a", node=NODES["b"])),  # b's node claims to be a
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(message=malformed, mode=st.sampled_from(["sequential", "mean"]))
def test_malformed_replies_change_nothing(hn_strategy, message, mode):
    strategy = hn_strategy
    before = snapshot(strategy)
    assert apply(strategy, message, mode, load_run_config(HN_CONFIG)).rejected == 1
    assert_same(before, snapshot(strategy))


def test_a_good_reply_still_updates(hn_strategy):
    before = snapshot(hn_strategy)
    valid, _ = validate(hn_strategy, [reply()], cfg=load_run_config(HN_CONFIG))
    assert len(valid) == 1
    hn_strategy.apply_train_reply(1, valid[0])
    changed = hn_strategy.hn.state_dict()["embeddings.a"]
    assert not torch.equal(before[0]["embeddings.a"], changed)


@settings(max_examples=30, deadline=None)
@given(delta=bad_delta(SIZES["a"]))
def test_fedavg_ignores_bad_deltas(delta):
    cfg = load_run_config({"strategy": "fedavg", "max-delta-norm": 100})
    strategy = FedAvg.from_config(cfg)
    strategy.vector = np.arange(50, dtype=np.float32)
    valid, check = validate(strategy, [reply(delta=delta)], cfg=cfg)
    assert not valid and check.rejected == 1
    assert np.array_equal(strategy.vector, np.arange(50, dtype=np.float32))


def test_too_few_replies_skip_the_update(monkeypatch):
    cfg = load_run_config({"strategy": "fedavg", "min-train-clients": 2})
    strategy = FedAvg.from_config(cfg)
    strategy.clients = registry()
    strategy.vector = np.zeros(50, np.float32)
    engine = Engine(strategy, cfg)
    engine.clients = registry()
    valid = engine.aggregate_train(1, [reply(), reply(error=True)])
    assert np.array_equal(strategy.vector, np.zeros(50, np.float32))
    assert engine.check.rejected == 1 and len(valid) == 1
