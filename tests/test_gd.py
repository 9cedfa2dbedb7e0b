"""MH-pFedHNGD: the distillation loss and the strategy's round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client_app.training import distillation_loss
from common import protocol as P
from server_app.strategies.mh_pfedhngd import GLOBAL
from tests.helpers import base_config, run, write_learnable_imagefolder


def test_distillation_loss_against_a_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    alpha, t = 0.25, 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row), softmax(s_row)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl /= 2  # batch mean
    ce = (
        -math.log(math.exp(1) / (math.exp(1) + 1))
        - math.log(math.exp(2) / (1 + math.exp(2)))
    ) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = distillation_loss(student, teacher, y, alpha, t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0 is plain cross-entropy; identical logits give zero KL.
    assert distillation_loss(student, student, y, 1.0, t).item() == pytest.approx(0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("gd"), 6, 24)


@pytest.mark.parametrize("update", ["sequential", "mean"])
def test_gd_round_trains_the_global_embedding_and_evaluates_personal_models(
    folder, tmp_path, update
):
    config = base_config(
        folder,
        tmp_path,
        strategy="mh-pfedhngd",
        models="cnn,vgg8",
        **{"hn-update": update, "num-server-rounds": 2, "run-name": update},
    )
    strategy, grid, _, rows = run(config, 4)
    assert [r["round"] for r in rows] == [1, 2]
    hn = strategy.hn
    # The global CNN shares its head with the CNN clients.
    assert hn.head_of(GLOBAL) == hn.head_of("client-0") == hn.head_of("client-1")
    assert strategy.optimizer.state[hn.embeddings[GLOBAL]]["step"] == 2  # one a round
    by_round = {}
    for m in grid.sent:
        kind = m.metadata.message_type
        if kind == MessageType.EVALUATE:
            assert P.GLOBAL_THETA not in m.content[P.ARRAYS]
        if kind == MessageType.TRAIN:
            g = m.content[P.ARRAYS][P.GLOBAL_THETA].numpy()
            by_round.setdefault(m.content[P.CONFIG][P.ROUND], []).append(g)
    for vectors in by_round.values():  # one round-start g for everyone
        assert all(np.array_equal(vectors[0], v) for v in vectors)
    assert not np.array_equal(by_round[1][0], by_round[2][0])
    replies = [r for r in grid.answered if P.ARRAYS in r.content]
    assert all(P.GLOBAL_DELTA in r.content[P.ARRAYS] for r in replies)


def test_a_batchnorm_teacher_normalises_with_batch_statistics():
    """The generated global model has no running statistics: its BatchNorm layers
    use the batch's (as the reference's teacher, left in training mode), dropout
    stays off, and its forward pass is the training-mode one."""
    from client_app.trainers.hypernet_gd import batch_statistics
    from common.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet10", 10, 3)
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    with torch.no_grad():
        fresh_eval = model.eval()(x)
        teacher = batch_statistics(model.eval())
        bn = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bn and all(m.training for m in bn) and not teacher.training
        got = teacher(x)
        expected = model.train()(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, fresh_eval, atol=1e-3)
