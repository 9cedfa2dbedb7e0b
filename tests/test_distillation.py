"""Distillation baselines: fml, fedkd and fd.

The algorithm-specific math on tiny hand-made inputs (mutual losses, FedKD's
adaptive weighting and SVD compression, FedDistill's logit aggregation and
regulariser), then each strategy for two rounds with the real ClientApp through
the in-process grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from client_app.trainers.fd import fd_regulariser
from client_app.trainers.fedkd import fedkd_losses
from client_app.trainers.fml import fml_losses
from client_app.training import LocalHParams, clip_groups, train_local
from common import lowrank
from common import protocol as P
from common.config import ConfigError, load_run_config
from server_app.engine.registry import ClientInfo
from server_app.strategies.fd import FedDistill
from server_app.strategies.fedkd import FedKD
from server_app.strategies.fml import FML
from tests.helpers import base_config, run, validated, write_learnable_imagefolder

CNN_6 = 234006 - 4 * 65  # the cnn's parameters for 6 classes
HEADER = 256  # at most this many bytes of .npy header per array on the wire


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 12)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_kl_mean(z: np.ndarray, target: np.ndarray) -> float:
    """KL(softmax(target) || softmax(z)) summed, divided by B * C."""
    lp, lq = np_log_softmax(target), np_log_softmax(z)
    return float((np.exp(lp) * (lp - lq)).sum() / z.size)


Z_P = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
Z_S = np.array([[0.2, 0.1, 0.4], [-1.0, 2.0, 0.0]])
Y = np.array([0, 1])


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


# -- FML ------------------------------------------------------------------------------
def test_fml_mutual_losses_by_hand():
    alpha, beta = 0.3, 0.6
    l_p, l_s = fml_losses(t(Z_P), t(Z_S), torch.tensor(Y), alpha, beta)
    expect_p = alpha * np_ce(Z_P, Y) + (1 - alpha) * np_kl_mean(Z_P, Z_S)
    expect_s = beta * np_ce(Z_S, Y) + (1 - beta) * np_kl_mean(Z_S, Z_P)
    assert l_p.item() == pytest.approx(expect_p, rel=1e-10)
    assert l_s.item() == pytest.approx(expect_s, rel=1e-10)
    # HtFLlib's defaults (1, 1): plain cross-entropy for each model, no coupling.
    z_p, z_s = t(Z_P, grad=True), t(Z_S, grad=True)
    l_p, l_s = fml_losses(z_p, z_s, torch.tensor(Y), 1.0, 1.0)
    assert l_p.item() == pytest.approx(np_ce(Z_P, Y))
    l_p.backward()
    assert z_s.grad is None or not z_s.grad.any()


def test_fml_refuses_weights_outside_unit_interval():
    with pytest.raises(ConfigError, match="'fml-alpha' = 1.5"):
        FML.from_config(load_run_config({"strategy": "fml", "fml-alpha": 1.5}))
    assert FML.from_config(load_run_config({"strategy": "fml", "fml-beta": 0.5}))


def test_mutual_learning_clips_each_model_on_its_own():
    """With fml-alpha = fml-beta = 1 the personal model's loss is its own
    cross-entropy, and per-model clipping (HtFLlib) leaves it training exactly as
    it would alone; one clip over both models together would rescale it by the
    other model's gradient too."""
    torch.manual_seed(0)
    x, y = 10 * torch.randn(16, 4), torch.randint(0, 3, (16,))
    hp = LocalHParams(batch_size=4, grad_clip=1.0)
    personal, shared = nn.Linear(4, 3), nn.Linear(4, 3)
    alone = nn.Linear(4, 3)
    alone.load_state_dict(personal.state_dict())
    pair = nn.ModuleDict({"personal": personal, "shared": shared})
    # Precondition: on a batch of four, each model's gradient alone exceeds the clip,
    # so the joint norm differs from the personal one and one joint clip would change
    # the result (checked: with a single clip group this test fails).
    grads = [
        torch.autograd.grad(F.cross_entropy(m(x[:4]), y[:4]), m.weight)[0].norm()
        for m in (personal, shared)
    ]
    assert min(grads) > hp.grad_clip

    def mutual(models, xb, yb):
        return sum(
            fml_losses(models["personal"](xb), models["shared"](xb), yb, 1.0, 1.0)
        )

    train_local(pair, x, y, hp, torch.Generator().manual_seed(1), mutual)
    train_local(alone, x, y, hp, torch.Generator().manual_seed(1))
    for a, b in zip(personal.parameters(), alone.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [len(g) for g in clip_groups(pair, list(pair.parameters()))] == [2, 2]
    assert len(clip_groups(alone, list(alone.parameters()))) == 1


# -- FedKD ----------------------------------------------------------------------------
def test_fedkd_adaptive_losses_by_hand():
    h_t = np.array([[1.0, 0.0], [0.5, -1.0]])
    h_s = np.array([[0.2, 0.3], [1.0, 1.0]])
    w = np.array([[1.0, 2.0], [0.0, -1.0]])
    w_h = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        w_h.weight.copy_(torch.tensor(w))
    l_t, l_s = fedkd_losses(t(h_t), t(Z_P), t(h_s), t(Z_S), w_h, torch.tensor(Y))
    ce_t, ce_s = np_ce(Z_P, Y), np_ce(Z_S, Y)
    scale = ce_t + ce_s
    mse = float(((h_t - h_s @ w.T) ** 2).mean())
    assert l_t.item() == pytest.approx(
        ce_t + (np_kl_mean(Z_P, Z_S) + mse) / scale, rel=1e-10
    )
    assert l_s.item() == pytest.approx(
        ce_s + (np_kl_mean(Z_S, Z_P) + mse) / scale, rel=1e-10
    )
    # The weight adapts: with both models twice as wrong, distillation counts less.
    y_wrong = torch.tensor([2, 2])
    l_t2, _ = fedkd_losses(t(h_t), t(Z_P), t(h_s), t(Z_S), w_h, y_wrong)
    scale2 = np_ce(Z_P, y_wrong.numpy()) + np_ce(Z_S, y_wrong.numpy())
    assert scale2 > scale
    assert l_t2.item() - np_ce(Z_P, y_wrong.numpy()) == pytest.approx(
        (np_kl_mean(Z_P, Z_S) + mse) / scale2, rel=1e-10
    )


def test_energy_rank_and_linear_schedule():
    sigma = np.array([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert [lowrank.energy_rank(sigma, e) for e in (0.5, 0.9, 0.95, 1.0)] == [
        1,
        2,
        3,
        3,
    ]
    assert lowrank.energy_rank(sigma, 9 / 14 - 1e-9) == 1
    assert lowrank.energy_rank(sigma, 9 / 14) == 2  # strictly more than e
    schedule = [lowrank.energy_at(r, 5, 0.95, 0.98) for r in range(1, 6)]
    np.testing.assert_allclose(schedule, [0.95, 0.9575, 0.965, 0.9725, 0.98])
    assert lowrank.energy_at(1, 1, 0.95, 0.98) == 0.95


def test_svd_compression_rank_error_and_bytes():
    rng = np.random.default_rng(0)
    low = (rng.normal(size=(40, 3)) * [10.0, 5.0, 1.0]) @ rng.normal(size=(3, 60))
    matrix = low + 0.01 * rng.normal(size=(40, 60))
    conv = rng.normal(size=(8, 4, 3, 3))
    bias = rng.normal(size=7)
    shapes = [(40, 60), (7,), (8, 4, 3, 3)]
    vector = np.concatenate([matrix.ravel(), bias, conv.ravel()]).astype(np.float32)
    factors, ranks = lowrank.compress(vector, shapes, 0.95)
    assert ranks.dtype == np.int32 and ranks[1] == 0
    assert 1 <= ranks[0] <= 3  # the energy sits in three directions
    # The 8 x 36 kernel matrix is nearly full-rank noise: dense beats its factors.
    assert ranks[2] == 0
    back = lowrank.decompress(factors, ranks, shapes)
    np.testing.assert_array_equal(back[2400:], vector[2400:])  # dense: exact
    sigma = np.linalg.svd(matrix.astype(np.float32), compute_uv=False)
    k = int(ranks[0])
    err = np.sum((back[:2400] - vector[:2400]) ** 2)
    assert err == pytest.approx(np.sum(sigma[k:] ** 2), rel=1e-3)
    assert err <= (1 - 0.95) * np.sum(sigma**2)
    assert factors.size == k * (40 + 60 + 1) + 7 + 288
    assert factors.nbytes + ranks.nbytes < vector.nbytes / 2
    # Energy 1 keeps everything (dense, exact).
    full, full_ranks = lowrank.compress(vector, shapes, 1.0)
    assert not full_ranks.any() and np.array_equal(full, vector)
    # Malformed encodings are refused.
    for bad_factors, bad_ranks in [
        (factors, ranks[:2]),
        (factors, ranks.astype(np.float32)),
        (factors[:-1], ranks),
        (np.append(factors, 0), ranks),
        (factors, np.array([41, 0, 0], np.int32)),
        (factors, np.array([k, 1, 0], np.int32)),
    ]:
        with pytest.raises(ValueError):
            lowrank.decompress(bad_factors, bad_ranks, shapes)


def reply(n: int = 1, **arrays) -> RecordDict:
    return RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.LOSS: 0.0, P.SECONDS: 0.0}),
        }
    )


def info(name: str, classes: int = 3) -> ClientInfo:
    return ClientInfo(name, 1, 3, 1, 1, classes, 3)


def test_fedkd_server_averages_rebuilt_students_and_recompresses():
    strategy = FedKD.from_config(
        load_run_config({"strategy": "fedkd", "num-server-rounds": 3})
    )
    strategy.shapes = [(6, 20), (6,)]
    rng = np.random.default_rng(1)
    base = (rng.normal(size=(6, 1)) @ rng.normal(size=(1, 20))).ravel()
    a = np.concatenate([base, np.ones(6)]).astype(np.float32)
    b = np.concatenate([2 * base, np.zeros(6)]).astype(np.float32)
    enc = {}
    for name, v in (("a", a), ("b", b)):
        f, r = lowrank.compress(v, strategy.shapes, 0.95)
        enc[name] = {lowrank.FACTORS: f, lowrank.RANKS: r}
    assert enc["a"][lowrank.RANKS][0] == 1
    strategy.apply_train_replies(
        2,
        validated(
            strategy,
            [
                (info("a"), reply(1, **enc["a"])),
                (info("b"), reply(3, **enc["b"])),
                (info("c"), reply(5, **{**enc["a"], lowrank.RANKS: np.int32([7, 0])})),
            ],
        )[0],
    )
    mean = (a + 3 * b) / 4
    np.testing.assert_allclose(strategy.vector, mean, atol=1e-5)
    assert strategy.ranks.tolist() == [1, 0]
    payload = strategy.train_payload(info("a"), 3)[P.ARRAYS]
    assert set(payload) == {lowrank.FACTORS, lowrank.RANKS}
    assert payload[lowrank.FACTORS].numpy().size == 6 + 1 + 20 + 6
    assert not strategy.eval_payload(info("a"), 3).array_records


# -- FedDistill -----------------------------------------------------------------------
def test_fd_regulariser_by_hand_and_htfllib_gradient():
    z = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 1.0]])
    y = np.array([0, 2, 1])
    g = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [9.0, 9.0, 9.0]])
    present = np.array([True, True, False])  # class 2 has no global logits
    zt = t(z, grad=True)
    reg = fd_regulariser(zt, torch.tensor(y), t(g), torch.tensor(present))
    q0, q1 = np.exp(np_log_softmax(g[[0]])), np.exp(np_log_softmax(g[[1]]))
    expect = -(q0 * np_log_softmax(z[[0]])).sum() - (q1 * np_log_softmax(z[[2]])).sum()
    assert reg.item() == pytest.approx(expect / 3, rel=1e-10)
    reg.backward()
    # HtFLlib: CE(z, softmax(z_hat)) with z_hat = z.detach(), present rows replaced.
    z2 = t(z, grad=True)
    z_hat = z2.detach().clone()
    z_hat[0], z_hat[2] = t(g[0]), t(g[1])
    F.cross_entropy(z2, z_hat.softmax(dim=1)).backward()
    torch.testing.assert_close(zt.grad, z2.grad)


def test_fd_server_class_means_by_hand():
    strategy = FedDistill.from_config(load_run_config({"strategy": "fd"}))
    strategy.num_classes = 3
    assert not strategy.train_payload(info("a"), 1).array_records
    t1 = np.float32([[1, 1, 1], [4, 0, 0], [0, 0, 0]])
    t2 = np.float32([[3, 3, 5], [0, 0, 0], [0, 0, 0]])

    def fd_reply(n, table, counts):
        return reply(n, **{P.LOGITS: table, P.PROTO_COUNTS: np.float32(counts)})

    strategy.apply_train_replies(
        1,
        validated(
            strategy,
            [
                (info("a"), fd_reply(10, t1, [1, 9, 0])),
                (info("b"), fd_reply(30, t2, [29, 0, 0])),
                (info("c"), fd_reply(5, t1[:2], [1, 1])),  # wrong shapes
                (info("d"), fd_reply(5, t1, [-1, 1, 1])),  # a negative count
            ],
        )[0],
    )
    # Unweighted over the clients holding each class (HtFLlib's logit_aggregation).
    np.testing.assert_allclose(strategy.logits, [[2, 2, 3], [4, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(strategy.counts, [30, 9, 0])
    payload = strategy.train_payload(info("a"), 2)[P.ARRAYS]
    assert payload[P.LOGITS].numpy().shape == (3, 3)
    assert not strategy.eval_payload(info("a"), 2).array_records


# -- the strategies with the real ClientApp -------------------------------------------
def two_rounds(folder, tmp_path, strategy: str, models: str = "cnn,resnet10"):
    config = base_config(folder, tmp_path, strategy=strategy, models=models)
    config |= {"num-server-rounds": 2, "run-name": strategy}
    strategy_obj, grid, _, rows = run(config, 3)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    evaluate = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(train) == 6 and len(evaluate) == 3
    assert all(not m.content.array_records.get(P.ARRAYS) for m in evaluate)
    assert all("model-params" in c.state for c in grid.contexts.values())
    return strategy_obj, grid, rows, train


def test_fml_runs_and_averages_the_meme(folder, tmp_path):
    strategy, grid, rows, train = two_rounds(folder, tmp_path, "fml")
    sent = [m.content[P.ARRAYS][P.SHARED].numpy() for m in train]
    assert all(s.shape == (CNN_6,) for s in sent)
    assert np.array_equal(sent[0], sent[2]) and not np.array_equal(sent[0], sent[3])
    replies = [m for m in grid.answered if m.metadata.message_type == "train"]
    assert all(r.content[P.ARRAYS][P.SHARED].numpy().shape == (CNN_6,) for r in replies)
    assert all(P.GLOBAL_LOSS in r.content[P.METRICS] for r in replies)
    assert 3 * 4 * CNN_6 < rows[-1]["bytes_up"] < 3 * 4 * CNN_6 + 3 * HEADER


def test_fedkd_sends_svd_factors(folder, tmp_path):
    strategy, grid, rows, train = two_rounds(folder, tmp_path, "fedkd")
    assert all(set(m.content[P.ARRAYS]) == {P.SHARED} for m in train[:3])
    for m in train[3:]:
        arrays = m.content[P.ARRAYS]
        assert set(arrays) == {lowrank.FACTORS, lowrank.RANKS}
        ranks = arrays[lowrank.RANKS].numpy()
        assert ranks.dtype == np.int32 and ranks.shape == (10,) and ranks.any()
    dense = rows[0]["bytes_down"]  # three dense students
    assert 3 * 4 * CNN_6 < dense < 3 * 4 * CNN_6 + 3 * HEADER
    assert rows[0]["bytes_up"] < dense  # round 1 uploads at energy 0.95
    assert rows[1]["bytes_down"] < dense
    kept = [c.state["fedkd-w-h"]["fedkd-w-h"].numpy() for c in grid.contexts.values()]
    assert all(k.shape == (64 * 64,) for k in kept)
    assert strategy.vector.shape == (CNN_6,)


def test_fd_shares_per_class_logits(folder, tmp_path):
    strategy, grid, rows, train = two_rounds(folder, tmp_path, "fd")
    assert all(not m.content.array_records.get(P.ARRAYS) for m in train[:3])
    for m in train[3:]:
        arrays = m.content[P.ARRAYS]
        assert arrays[P.LOGITS].numpy().shape == (6, 6)
        assert arrays[P.PROTO_COUNTS].numpy().shape == (6,)
    replies = [m for m in grid.answered if m.metadata.message_type == "train"]
    counts = sum(r.content[P.ARRAYS][P.PROTO_COUNTS].numpy() for r in replies[:3])
    np.testing.assert_array_equal(strategy.counts, counts)
    assert 3 * 4 * (36 + 6) < rows[-1]["bytes_up"] < 3 * 4 * (36 + 6) + 6 * HEADER
