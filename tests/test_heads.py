"""Compact hypernetwork heads (``head-type``): math, gradients, sizes, files."""

from __future__ import annotations

import pytest
import torch

from common.models import build_model, num_chunks, num_trainable
from server_app.hypernet import (
    HyperNetwork,
    LowRankHeads,
    SharedHead,
    head_parameter_count,
    make_head,
)

HEAD_TYPES = ("per-position", "shared", "low-rank")
PAPER_MODELS = ("cnn", "vgg8", "resnet10", "resnet12", "resnet18")


def test_shared_head_is_one_map_plus_a_position_bias():
    torch.manual_seed(0)
    head = SharedHead(5, 6, 11)
    feats = torch.randn(5, 6)
    expected = torch.stack([head.weight @ feats[j] + head.bias[j] for j in range(5)])
    torch.testing.assert_close(head(feats), expected)


def test_low_rank_head_is_a_per_position_rank_r_map():
    torch.manual_seed(0)
    head = LowRankHeads(4, 6, 11, rank=3)
    feats = torch.randn(4, 6)
    expected = torch.stack(
        [head.weight[j] @ head.project @ feats[j] + head.bias[j] for j in range(4)]
    )
    torch.testing.assert_close(head(feats), expected)
    for j in range(4):
        assert torch.linalg.matrix_rank(head.weight[j] @ head.project) == 3


def test_low_rank_init_matches_the_per_position_variance():
    gen = torch.Generator().manual_seed(0)
    per = make_head("per-position", 20, 128, 300, generator=gen)
    low = make_head("low-rank", 20, 128, 300, rank=8, generator=gen)
    var_per = per.weight.var().item()
    var_low = (low.weight @ low.project).var().item()
    assert var_low == pytest.approx(var_per, rel=0.1)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_vjp_equals_autograd_for_every_head_type(head_type):
    """The server's VJP (accumulate_vjp) is autograd of theta with delta."""
    torch.manual_seed(0)
    fast = HyperNetwork(8, 16, 2, 30, head_type=head_type, head_rank=3)
    slow = HyperNetwork(8, 16, 2, 30, head_type=head_type, head_rank=3)
    for name, k in [("a", 100), ("b", 95), ("c", 40)]:
        gen = torch.Generator().manual_seed(len(name) + k)
        fast.add_client(name, k, generator=gen)
        slow.add_client(name, k, generator=torch.Generator().manual_seed(len(name) + k))
    slow.load_state_dict(fast.state_dict())
    for name, k in [("a", 100), ("b", 95)]:
        delta = torch.randn(k)
        fast.accumulate_vjp(name, delta)
        slow(name).backward(delta)
    pairs = zip(fast.named_parameters(), slow.named_parameters(), strict=True)
    for (key, p), (_, q) in pairs:
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=key)
    assert fast.embeddings["c"].grad is None


@pytest.mark.parametrize("head_type", ("shared", "low-rank"))
def test_frozen_compact_head_passes_the_gradient_to_the_embedding_only(head_type):
    hn = HyperNetwork(8, 16, 2, 30, head_type=head_type)
    hn.add_client("a", 70)
    hn.heads["3"].requires_grad_(False)
    hn.extractor.requires_grad_(False)
    hn.accumulate_vjp("a", torch.randn(70))
    assert all(p.grad is None for p in hn.heads.parameters())
    assert hn.embeddings["a"].grad.abs().sum() > 0


def test_parameter_counts_follow_the_formulas():
    n, h, c, r = 7, 16, 30, 3
    count = {t: sum(p.numel() for p in make_head(t, n, h, c, r).parameters())
             for t in HEAD_TYPES}  # fmt: skip
    assert count["per-position"] == n * c * (h + 1)
    assert count["shared"] == c * h + n * c
    assert count["low-rank"] == n * c * (r + 1) + r * h
    for head_type in HEAD_TYPES:
        assert head_parameter_count(head_type, n, h, c, r) == count[head_type]


def test_compact_heads_are_10x_smaller_on_the_paper_setting():
    sizes = [num_trainable(build_model(m, 10)) for m in PAPER_MODELS]
    params = {}
    for head_type in HEAD_TYPES:
        hn = HyperNetwork(head_type=head_type)
        for i, k in enumerate(sizes):
            hn.add_client(f"c{i}", k)
        params[head_type] = sum(p.numel() for p in hn.parameters())
    assert [num_chunks(k, 3072) for k in sizes] == [77, 88, 114, 171, 185]
    assert params["per-position"] > 250e6
    assert params["per-position"] / params["shared"] >= 10
    assert params["per-position"] / params["low-rank"] >= 10


def test_a_saved_hypernetwork_of_another_head_type_is_refused(tmp_path):
    saved = HyperNetwork(8, 16, 2, 30, head_type="shared")
    saved.add_client("a", 70)
    saved.save(tmp_path / "hn.pt")
    other = HyperNetwork(8, 16, 2, 30)
    other.add_client("a", 70)
    with pytest.raises(ValueError, match="head-type.*shared.*per-position"):
        other.load_trained(tmp_path / "hn.pt")
    same = HyperNetwork(8, 16, 2, 30, head_type="shared")
    same.add_client("a", 70)
    assert same.load_trained(tmp_path / "hn.pt") == {"3"}
    torch.testing.assert_close(same("a"), saved("a"))


def test_unknown_head_type_is_refused():
    with pytest.raises(ValueError, match="allowed: per-position, shared, low-rank"):
        HyperNetwork(head_type="diagonal")
