"""Prototype baselines: fedproto, fedtgp, fedgh.

The math on tiny hand-made inputs (client and server side), then each strategy
for a few rounds with the real ClientApp through the in-process grid.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from client_app.prototypes import (
    ABSENT_DISTANCE,
    local_prototypes,
    nearest_prototype_logits,
    prototype_loss,
    prototype_regulariser,
    received_prototypes,
)
from common import protocol as P
from common.config import load_run_config
from server_app.engine.registry import ClientInfo, ClientRegistry
from server_app.strategies.fedgh import FedGH, header_loss
from server_app.strategies.fedproto import FedProto
from server_app.strategies.fedtgp import (
    FedTGP,
    TrainablePrototypes,
    adaptive_margin,
    tgp_loss,
)
from server_app.strategies.prototypes import (
    ClientPrototypes,
    PrototypeWidthMismatch,
    prototype_pairs,
    seeded_module,
)
from tests.helpers import base_config, run, validated, write_learnable_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 12)


class Identity(nn.Module):
    """features(x) = x, head = Linear(D, C): for hand computations."""

    def __init__(self, dim: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


# -- client side -----------------------------------------------------------------
def test_local_prototypes_are_class_means_in_eval_mode():
    model = nn.Sequential()  # only to check that eval mode is set
    model.features = lambda x: x  # type: ignore[method-assign]
    model.train()
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 7.0]])
    y = torch.tensor([0, 0, 2])
    protos, counts = local_prototypes(model, x, y, 3, batch_size=2)
    np.testing.assert_allclose(protos, [[2, 2], [0, 0], [5, 7]])
    np.testing.assert_array_equal(counts, [2, 0, 1])
    assert protos.dtype == counts.dtype == np.float32 and not model.training


def test_fedproto_regulariser_by_hand():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [7.0, 7.0]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])
    # (1 + 4) + (4 + 9) over B * D = 6; the third sample (no prototype) adds 0.
    reg = prototype_regulariser(feats, y, protos, present)
    assert reg.item() == pytest.approx(18 / 6)
    # HtFLlib's form: MSELoss(rep.detach() with present rows replaced, rep).
    target = feats.detach().clone()
    target[:2] = protos[:2]
    assert reg.item() == pytest.approx(F.mse_loss(target, feats).item())
    reg.backward()
    np.testing.assert_allclose(feats.grad, [[2 / 6, 4 / 6], [4 / 6, 6 / 6], [0, 0]])
    # The full loss: CE of the head plus lambda times the regulariser.
    model = Identity()
    x = feats.detach()
    loss = prototype_loss(protos, present, 0.5)(model, x, y)
    expected = F.cross_entropy(model(x), y) + 0.5 * 3.0
    assert loss.item() == pytest.approx(expected.item())
    plain = prototype_loss(None, None, 0.5)(model, x, y)
    assert plain.item() == pytest.approx(F.cross_entropy(model(x), y).item())


def test_nearest_prototype_prediction():
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    present = torch.tensor([True, True, False])
    x = torch.tensor([[1.0, 0.0], [9.0, 1.0], [0.0, 9.0]])
    logits = nearest_prototype_logits(protos, present)(Identity(), x)
    # The third is nearest to class 2, which has no prototype: class 0 (81 < 181).
    assert logits.argmax(1).tolist() == [0, 1, 0]
    assert logits[0, :2].tolist() == [-1.0, -81.0]
    assert logits[0, 2].item() == -ABSENT_DISTANCE


def test_received_prototypes_reads_the_mask():
    def content(mask):
        arrays = {P.PROTOS: np.ones((3, 2), np.float32), P.PROTO_COUNTS: mask}
        return RecordDict(
            {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})}
        )

    protos, present = received_prototypes(content(np.float32([1, 0, 1])))
    assert protos.shape == (3, 2) and present.tolist() == [True, False, True]
    assert received_prototypes(content(np.zeros(3, np.float32))) is None
    assert received_prototypes(RecordDict()) is None


# -- server side -----------------------------------------------------------------
def reply(protos, counts) -> RecordDict:
    arrays = {P.PROTOS: np.asarray(protos), P.PROTO_COUNTS: np.asarray(counts)}
    return RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1, P.LOSS: 0.0, P.SECONDS: 0.0}),
        }
    )


def clients(*names: str, classes: int = 3) -> list[ClientInfo]:
    return [ClientInfo(n, i, 10, 5, 5, classes, 3) for i, n in enumerate(names)]


def strategy(cls, infos: list[ClientInfo], **config):
    s = cls.from_config(load_run_config({"strategy": cls.name, **config}))
    s.setup(ClientRegistry(infos))
    return s


def test_fedproto_aggregation_leaves_out_clients_without_the_class():
    a, b, c, d, e = clients("a", "b", "c", "d", "e")
    s = strategy(FedProto, [a, b, c, d, e])
    valid, check = validated(
        s,
        [
            (a, reply(np.float32([[1, 1], [5, 5], [99, 99]]), np.float32([4, 1, 0]))),
            (b, reply(np.float32([[3, 3], [0, 0], [99, 99]]), np.float32([1, 0, 0]))),
            (c, reply(np.float32([[9, 9], [9, 9]]), np.float32([1, 1, 1]))),  # shape
            (d, reply(np.float32([[9, 9]] * 3), np.float32([1, -1, 1]))),  # negative
            (e, reply(np.float32([[np.nan, 9]] * 3), np.float32([1, 1, 1]))),  # NaN
        ],
    )
    s.apply_train_replies(1, valid)
    # Unweighted: class 0 is (1 + 3) / 2 although a holds 4 examples.
    np.testing.assert_allclose(s.global_protos[:2], [[2, 2], [5, 5]])
    assert s.present.tolist() == [True, True, False] and s.feature_dim == 2
    assert check.rejected == 3  # c, d and e: logged and counted once each
    payload = s.train_payload(a, 2)[P.ARRAYS]
    assert payload[P.PROTO_COUNTS].numpy().tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(PrototypeWidthMismatch, match="a: 2, b: 3"):
        s.apply_train_replies(
            2,
            validated(
                s,
                [
                    (a, reply(np.zeros((3, 2), np.float32), np.float32([1, 1, 1]))),
                    (b, reply(np.zeros((3, 3), np.float32), np.float32([1, 1, 1]))),
                ],
            )[0],
        )


def test_fedtgp_margin_by_hand():
    means = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [50.0, 50.0]])
    present = np.array([True, True, True, False])
    # Nearest other class: 0 -> 2 (1), 1 -> 2 (sqrt 18), 2 -> 0 (1); max sqrt 18.
    assert adaptive_margin(means, present, 100.0) == pytest.approx(math.sqrt(18))
    assert adaptive_margin(means, present, 2.0) == 2.0
    assert adaptive_margin(means, [True, False, False, False], 7.0) == 7.0


def test_fedtgp_contrastive_loss_by_hand():
    generated = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([0, 1])
    # Distances [0, 5] and [3, 4]; the own class gets + margin 1: [1, 5], [3, 5].
    first = -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-5)))
    second = -math.log(math.exp(-5) / (math.exp(-3) + math.exp(-5)))
    loss = tgp_loss(q, y, generated, 1.0)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-5)


def separable_uploads(dim: int = 4) -> list[ClientPrototypes]:
    eye = np.eye(3, dim, dtype=np.float32) * 4
    return [
        ClientPrototypes("a", eye + 0.1, np.float32([3, 2, 0])),
        ClientPrototypes("b", eye - 0.1, np.float32([0, 2, 5])),
    ]


def test_fedtgp_generator_learns_separated_prototypes():
    config = {"server-epochs": 200, "seed": 3, "tgp-margin": 1.0}
    s = strategy(FedTGP, clients("a", "b"), **config)
    s.feature_dim = 4
    means, present = s.mean_prototypes(separable_uploads())
    # Class means [4.1, .1, .1, .1], [0, 4, 0, 0], [-.1, -.1, 3.9, -.1].
    assert adaptive_margin(means, present, 100.0) == pytest.approx(math.sqrt(32.04))
    x, y = prototype_pairs(separable_uploads())
    assert y.tolist() == [0, 1, 1, 2]
    initial = seeded_module(3, lambda: TrainablePrototypes(3, 4, 4))
    before = tgp_loss(x, y, initial(), 1.0).item()
    s.update(1, separable_uploads())
    assert s.margin == 1.0  # clipped by tgp-margin
    assert tgp_loss(x, y, s.generator(), 1.0).item() < before / 2
    assert s.global_protos.shape == (3, 4) and s.present.all()
    dist = torch.cdist(x, torch.from_numpy(s.global_protos))
    assert dist.argmin(1).tolist() == y.tolist()


def test_fedgh_header_training_reduces_cross_entropy():
    s = strategy(FedGH, clients("a", "b"), **{"server-epochs": 200, "seed": 3})
    s.feature_dim = 4
    x, y = prototype_pairs(separable_uploads())
    before = header_loss(seeded_module(3, lambda: nn.Linear(4, 3)), x, y).item()
    s.update(1, separable_uploads())
    after = header_loss(s.header, x, y).item()
    assert after < before / 2
    assert (s.header(x).argmax(1) == y).all()
    head = s.train_payload(clients("a")[0], 2)[P.ARRAYS][P.HEAD].numpy()
    assert head.shape == (3 * 4 + 3,)


# -- with the real ClientApp -----------------------------------------------------
def arrays_of(messages, round_: int, kind: str = "train") -> list[dict]:
    return [
        {k: v.numpy() for k, v in m.content.array_records.get(P.ARRAYS, {}).items()}
        for m in messages
        if m.metadata.group_id == str(round_) and m.metadata.message_type == kind
    ]


@pytest.mark.parametrize("name", ["fedproto", "fedtgp", "fedgh"])
def test_prototype_strategies_run(folder, tmp_path, name):
    """Two rounds, clients cnn, cnn, resnet10: round 1 sends nothing, round 2 the
    global state; every train reply uploads prototypes of its train split."""
    config = base_config(folder, tmp_path, strategy=name, models="cnn,resnet10")
    config |= {"run-name": name, "server-epochs": 20, "num-server-rounds": 2}
    s, grid, _, rows = run(config, 3)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["eval_clients"] == 3 for r in rows)
    assert s.feature_dim == 64 and s.num_classes == 6
    assert arrays_of(grid.sent, 1) == [{}, {}, {}]  # nothing known before round 1
    down = arrays_of(grid.sent, 2) + arrays_of(grid.sent, 2, "evaluate")
    assert len(down) == 6
    if name == "fedgh":
        assert all(set(a) == {P.HEAD} and a[P.HEAD].shape == (390,) for a in down)
        # The global header is what every client evaluated with.
        head = down[-1][P.HEAD]
        assert all(np.array_equal(a[P.HEAD], head) for a in down[3:])
    else:
        assert all(a[P.PROTOS].shape == (6, 64) for a in down)
        assert all(set(np.unique(a[P.PROTO_COUNTS])) <= {0.0, 1.0} for a in down)
        np.testing.assert_array_equal(down[-1][P.PROTOS], s.global_protos)
    ups = [r.content for r in grid.answered if r.metadata.message_type == "train"]
    assert len(ups) == 6
    for content in ups:
        counts = content[P.ARRAYS][P.PROTO_COUNTS].numpy()
        assert content[P.ARRAYS][P.PROTOS].numpy().shape == (6, 64)
        assert counts.shape == (6,)
        assert counts.sum() == content[P.METRICS][P.NUM_EXAMPLES]
    assert rows[-1]["bytes_up"] > 3 * (6 * 64 + 6) * 4


def readings_script(run_dir, data_dir) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[1] / "scripts" / "prototype_readings.py"
    return subprocess.run(
        [sys.executable, str(script), str(run_dir), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prototype_readings_rebuild_the_last_evaluation(folder, tmp_path):
    """scripts/prototype_readings.py on a finished fedproto run: every client is
    rebuilt from its saved state, so the prototype reading is the run's last
    accuracy; the own-head reading is the same models through their heads."""
    config = base_config(folder, tmp_path, strategy="fedproto", models="cnn,resnet10")
    state_dir = tmp_path / "p" / "client-state"
    config |= {"run-name": "p", "num-server-rounds": 2}
    config |= {"client-state-dir": str(state_dir)}
    _, _, results, rows = run(config, 3)
    done = readings_script(results.path, folder)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0] == "p: round 2, 3 clients"
    assert [line.split(" | ")[0] for line in table[3:]] == [
        "| cnn",
        "| resnet10",
        "| all",
    ]
    cells = table[-1].strip("| ").split(" | ")
    assert cells[1] == f"{100 * rows[-1]['accuracy']:.2f}"
    assert 0 <= float(cells[2]) <= 100 and 0 <= float(cells[3]) <= 100

    shutil.rmtree(state_dir)
    done = readings_script(results.path, folder)
    assert done.returncode != 0
    assert "has no client-state/ (run-config client-state-dir keeps it)" in done.stderr
