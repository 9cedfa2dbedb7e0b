"""pFedHN: per-tensor heads for one architecture, on MH-pFedHN's round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.flat import load_flat_, trainable_params
from common.models import build_model, num_trainable
from server_app.hypernet import PerTensorHyperNetwork
from tests.helpers import (
    base_config,
    label_prior_accuracy,
    run,
    write_learnable_imagefolder,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("folder"), 6, 24)


def test_one_head_per_tensor_generates_the_model():
    model = build_model("cnn", 10)
    sizes = [p.numel() for p in trainable_params(model)]
    hn = PerTensorHyperNetwork(sizes, embed_dim=3, hidden_dim=7, hidden_layers=3)
    hn.add_client("a", num_trainable(model))
    heads = hn.heads[hn.head_of("a")]
    assert [h.out_features for h in heads] == sizes
    # pFedHN's MLP: e -> h, then 3 x (ReLU, h -> h); no ReLU after the last.
    linears = [m for m in hn.extractor if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and not isinstance(hn.extractor[-1], torch.nn.ReLU)
    theta = hn.generate("a")
    load_flat_(model, theta)
    # Tensor t of the model is head t applied to f(v).
    features = hn.extractor(hn.embeddings["a"])
    first = trainable_params(model)[0]
    expected = heads[0](features).reshape(first.shape)
    torch.testing.assert_close(first.detach(), expected.detach())
    with pytest.raises(ValueError, match="every client must run it"):
        hn.add_client("b", 12)


def test_vjp_is_the_gradient_of_the_inner_product():
    hn = PerTensorHyperNetwork([6, 4], embed_dim=2, hidden_dim=5, hidden_layers=1)
    hn.add_client("a", 10)
    delta = torch.randn(10)
    hn.accumulate_vjp("a", delta)
    grads = [p.grad.clone() for p in hn.parameters()]
    hn.zero_grad()
    (hn("a") * delta).sum().backward()
    for g, p in zip(grads, hn.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_pfedhn_round_trip(folder, tmp_path):
    """pFedHN learns personal models: after 5 rounds every client's generated model
    beats what its label prior gives (0.84 on this small partition; 0.22 after
    round 1; the run reaches 1.0 from round 4)."""
    config = base_config(folder, tmp_path, strategy="pfedhn", models="cnn")
    # 2 local epochs at a larger step: the default (one SGD step per round on
    # these ~20 images) barely moves the generated models in a few rounds.
    config |= {"num-server-rounds": 5, "local-epochs": 2, "client-lr": 0.05}
    strategy, _, results, rows = run(config | {"run-name": "p", "hn-window": 0}, 4)
    assert len(rows) == 5
    prior = label_prior_accuracy(folder, 4)
    assert rows[-1]["accuracy"] >= max(0.9, prior + 0.05), (rows[-1], prior)
    assert rows[0]["accuracy"] < prior  # round 1's generated models had not learnt
    assert strategy.hn.embed_dim == 2  # 1 + 4 // 4
    assert isinstance(strategy.optimizer, torch.optim.SGD)
    assert strategy.optimizer.defaults["momentum"] == 0.9
    before = {n: e.detach().clone() for n, e in strategy.hn.embeddings.items()}
    assert all(np.isfinite(b.numpy()).all() for b in before.values())
    assert (results.path / "hypernet.pt").is_file()
