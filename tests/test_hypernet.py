"""The hypernetwork: batched heads, head sharing, the VJP update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ConfigError, RunConfig, load_run_config
from server_app.engine.registry import ClientInfo, ClientRegistry
from server_app.hypernet import HyperNetwork, PositionHeads
from server_app.strategies.mh_pfedhn import MHPFedHN


def test_batched_heads_equal_per_position_linear_maps():
    torch.manual_seed(0)
    n, h, c = 7, 16, 40
    heads = PositionHeads(n, h, c)
    linears = nn.ModuleList(nn.Linear(h, c) for _ in range(n))
    with torch.no_grad():
        for j, lin in enumerate(linears):
            lin.weight.copy_(heads.weight[j])
            lin.bias.copy_(heads.bias[j])
    feats = torch.randn(n, h, requires_grad=True)
    feats_ref = feats.detach().clone().requires_grad_(True)

    out = heads(feats)
    ref = torch.stack([lin(feats_ref[j]) for j, lin in enumerate(linears)])
    torch.testing.assert_close(out, ref)

    grad_out = torch.randn(n, c)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(feats.grad, feats_ref.grad)
    for j, lin in enumerate(linears):
        torch.testing.assert_close(heads.weight.grad[j], lin.weight.grad)
        torch.testing.assert_close(heads.bias.grad[j], lin.bias.grad)


def test_head_init_matches_linear_bounds():
    heads = PositionHeads(3, 128, 50)
    bound = 1 / 128**0.5
    assert heads.weight.abs().max() <= bound
    assert heads.bias.abs().max() <= bound


def test_heads_are_shared_by_chunk_count_not_arrival_order():
    hn = HyperNetwork(embed_dim=8, hidden_dim=8, chunk_size=10)
    # Largest first: the reference code's first-seen order would mis-assign heads.
    hn.add_client("big", 95)  # 10 chunks
    hn.add_client("small", 21)  # 3 chunks
    hn.add_client("small-2", 30)  # 3 chunks
    hn.add_client("big-2", 91)  # 10 chunks
    assert sorted(hn.heads) == ["10", "3"]
    assert hn.head_of("small") == hn.head_of("small-2") == "3"
    assert hn.head_of("big") == hn.head_of("big-2") == "10"
    for name, k in [("big", 95), ("small", 21), ("small-2", 30), ("big-2", 91)]:
        assert hn(name).shape == (k,)
    assert hn.embeddings["big"].shape == (10, 8)


def test_embedding_init_std():
    hn = HyperNetwork(embed_dim=64, chunk_size=100)
    hn.add_client("a", 100 * 500, generator=torch.Generator().manual_seed(0))
    std = hn.embeddings["a"].detach().std().item()
    assert std == pytest.approx(0.002, rel=0.05)


def test_reregistering_with_another_size_is_refused():
    hn = HyperNetwork(embed_dim=4, hidden_dim=4, chunk_size=10)
    hn.add_client("a", 25)
    assert hn.add_client("a", 25) == []
    with pytest.raises(ValueError, match="registered with 25"):
        hn.add_client("a", 26)
    with pytest.raises(ValueError, match="invalid client name"):
        hn.add_client("a.b", 10)


def _strategy(**overrides) -> MHPFedHN:
    cfg = RunConfig(embed_dim=8, hidden_dim=16, chunk_size=50, **overrides)
    strat = MHPFedHN.from_config(cfg)
    strat.register("a", 120)
    strat.register("b", 300)
    strat.register("c", 130)
    return strat


def test_vjp_equals_autograd_of_scalar_loss():
    """accumulate_vjp(delta) gives grad_phi <theta(phi), delta> (torch.func)."""
    strat = _strategy()
    hn = strat.hn
    delta = torch.randn(120)
    hn.accumulate_vjp("a", delta)
    vjp_grads = {
        n: p.grad.clone() for n, p in hn.named_parameters() if p.grad is not None
    }
    hn.zero_grad(set_to_none=True)

    params = {n: p.detach() for n, p in hn.named_parameters()}

    def scalar(p):
        theta = torch.func.functional_call(hn, p, ("a",))
        return (theta * delta).sum()

    ref = torch.func.grad(scalar)(params)
    # Only the parameters on a's path get gradients: extractor, its head, its rows.
    on_path = {n for n in params if n.startswith(("extractor.", "heads.3."))}
    assert set(vjp_grads) == on_path | {"embeddings.a"}
    for name, grad in vjp_grads.items():
        torch.testing.assert_close(grad, ref[name])
    # Parameters off the path get exactly zero from the scalar loss.
    assert torch.count_nonzero(ref["embeddings.b"]) == 0


def test_vjp_accumulates_like_autograd_over_clients_sharing_a_head():
    strat = _strategy()
    hn = strat.hn
    d_a, d_c = torch.randn(120), torch.randn(130)
    hn.accumulate_vjp("a", d_a)
    hn.accumulate_vjp("c", d_c)
    got = {n: p.grad.clone() for n, p in hn.named_parameters() if p.grad is not None}
    hn.zero_grad(set_to_none=True)
    ((hn("a") * d_a).sum() + (hn("c") * d_c).sum()).backward()
    ref = {n: p.grad for n, p in hn.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])


def test_hn_step_moves_only_touched_parameters_and_clips():
    strat = _strategy(hn_grad_clip=1e-3)
    before = {n: p.detach().clone() for n, p in strat.hn.named_parameters()}
    norm = strat.hn_step([("a", torch.randn(120) * 100, 1.0)])
    assert norm > 1e-3
    after = dict(strat.hn.named_parameters())
    assert not torch.equal(before["embeddings.a"], after["embeddings.a"])
    assert torch.equal(before["embeddings.b"], after["embeddings.b"])
    assert torch.equal(before["embeddings.c"], after["embeddings.c"])
    b_head = strat.hn.head_of("b")
    assert torch.equal(
        before[f"heads.{b_head}.weight"], after[f"heads.{b_head}.weight"]
    )


@pytest.mark.parametrize("clip", [50.0, 1e-2])
def test_mean_update_is_adam_on_the_weighted_scalar_loss(clip):
    """One hn_step == autograd of sum_k w_k <theta_k, delta_k>, clip, plain Adam."""
    strat = _strategy(hn_update="mean", hn_grad_clip=clip)
    ref = _strategy(hn_update="mean", hn_grad_clip=clip)  # same seed: same init
    d_a, d_c = torch.randn(120), torch.randn(130)
    strat.hn_step([("a", d_a, 0.25), ("c", d_c, 0.75)])

    hn = ref.hn
    adam = torch.optim.Adam(hn.parameters(), lr=ref.params.hn_lr)
    loss = 0.25 * (hn("a") * d_a).sum() + 0.75 * (hn("c") * d_c).sum()
    loss.backward()
    params = [p for p in hn.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, clip)
    adam.step()
    for (name, got), (_, want) in zip(
        strat.hn.named_parameters(), hn.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)


def test_theta_cache_is_cleared_by_an_update():
    strat = _strategy()
    first = strat.theta("a")
    assert strat.theta("a") is first
    strat.hn_step([("a", torch.randn(120), 1.0)])
    assert not (strat.theta("a") == first).all()


def test_evaluation_vectors_are_not_cached():
    """Evaluating every client must not keep every client's theta in memory."""
    strat = _strategy()
    infos = {
        n: ClientInfo(n, i + 1, k, 10, 10, 10, 3)
        for i, (n, k) in enumerate([("a", 120), ("b", 300), ("c", 130)])
    }
    sent = strat.eval_payload(infos["b"], 1)
    assert strat._theta_cache == {}
    train = strat.train_payload(infos["a"], 1)
    assert set(strat._theta_cache) == {"a"}
    again = strat.eval_payload(infos["a"], 1)  # reuses the training vector
    np.testing.assert_array_equal(
        again["arrays"]["theta"].numpy(), train["arrays"]["theta"].numpy()
    )
    assert sent["arrays"]["theta"].numpy().shape == (300,)


def test_heads_are_not_a_copy_of_the_extractor_initialisation():
    """The heads' stream is derived from the seed, not the extractor's stream again:
    equal streams made head weights a scaled copy of the extractor's weights."""
    strat = _strategy()
    extractor = torch.cat(
        [p.detach().flatten() for p in strat.hn.extractor.parameters()]
    )
    head = strat.hn.heads["3"]  # client "a": 120 parameters in chunks of 50
    weights = head.weight.detach().flatten()[: extractor.numel()]
    corr = np.corrcoef(extractor.numpy(), weights.numpy())[0, 1]
    assert abs(corr) < 0.1
    assert torch.equal(_strategy().hn.heads["3"].weight, head.weight)


def test_reference_init_equals_the_authors_construction():
    """hn-init = "reference": the authors' script builds its client models, then a
    hypernetwork of nn.Parameter embeddings, nn.Linear extractor layers and one
    nn.Linear per chunk position, all from the global stream seeded once. Replayed
    here with models that draw one number per parameter, the initial hypernetwork
    must be that one exactly (client order natural: c2 before c10)."""
    d, h, chunk, seed = 8, 16, 50, 7
    sizes = {"c2": 120, "c10": 300, "c3": 130}  # Linear(11, 10) / (29, 10) / (12, 10)
    order = ["c2", "c3", "c10"]
    torch.manual_seed(seed)
    for name in order:
        nn.Linear(sizes[name] // 10 - 1, 10)  # the client model, K = sizes[name]
    n = {name: -(-sizes[name] // chunk) for name in order}
    embeddings = [torch.normal(0, 0.002, (n[name], d)) for name in order]
    layers = [nn.Linear(a, h) for a in (d, h, h)]
    extractor = nn.Sequential(*(m for layer in layers for m in (layer, nn.ReLU())))
    heads = {
        k: [nn.Linear(h, chunk) for _ in range(k)] for k in dict.fromkeys(n.values())
    }

    cfg = RunConfig(
        embed_dim=d, hidden_dim=h, chunk_size=chunk, seed=seed, hn_init="reference"
    )
    strat = MHPFedHN.from_config(cfg)
    clients = ClientRegistry(
        ClientInfo(name, i + 1, k, 10, 10, 10, 3)
        for i, (name, k) in enumerate(sizes.items())
    )
    state = torch.get_rng_state()
    strat.setup(clients)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    hn = strat.hn
    for name, emb in zip(order, embeddings, strict=True):
        assert torch.equal(hn.embeddings[name], emb), name
    ours = [m for m in hn.extractor if isinstance(m, nn.Linear)]
    for got, want in zip(ours, layers, strict=True):
        assert torch.equal(got.weight, want.weight)
        assert torch.equal(got.bias, want.bias)
    for k, maps in heads.items():
        for j, linear in enumerate(maps):
            assert torch.equal(hn.heads[str(k)].weight[j], linear.weight), (k, j)
            assert torch.equal(hn.heads[str(k)].bias[j], linear.bias), (k, j)
    for name, emb in zip(order, embeddings, strict=True):  # and so the models
        features = extractor(emb)
        want = torch.cat([heads[n[name]][j](features[j]) for j in range(n[name])])
        torch.testing.assert_close(hn(name), want[: sizes[name]], msg=name)


def test_reference_init_is_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="hn-init"):
        load_run_config({"hn-init": "reference", "head-type": "shared"})
    with pytest.raises(ConfigError, match="hn-init"):
        load_run_config({"hn-init": "reference", "strategy": "local"})
