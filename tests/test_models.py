"""Tests for the model zoo (common.models) and flat vectors (common.flat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.flat import (
    buffer_state,
    flatten_params,
    load_buffer_state_,
    load_flat_,
    trainable_params,
)
from common.models import (
    available_models,
    build_model,
    main,
    num_chunks,
    num_trainable,
)

NAMES = ["cnn", "vgg8", "resnet10", "resnet12", "resnet18"]

# name -> (K for 10 classes, K for 100 classes, chunks 10, chunks 100)
EXPECTED = {
    "cnn": (234_006, 239_856, 77, 79),
    "vgg8": (268_814, 274_664, 88, 90),
    "resnet10": (347_178, 353_028, 114, 115),
    "resnet12": (523_242, 529_092, 171, 173),
    "resnet18": (565_386, 571_236, 185, 186),
}


def test_registry_lists_the_five_models() -> None:
    assert available_models() == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("classes", [10, 100])
def test_trainable_counts_and_chunks(name: str, classes: int) -> None:
    k10, k100, n10, n100 = EXPECTED[name]
    k, n = (k10, n10) if classes == 10 else (k100, n100)
    model = build_model(name, classes)
    assert num_trainable(model) == k
    assert num_chunks(k) == n
    assert num_chunks(k, chunk_size=3072) == n
    assert flatten_params(model).numel() == k


def test_num_chunks_is_ceil_division() -> None:
    assert num_chunks(0) == 0
    assert num_chunks(1) == 1
    assert num_chunks(3072) == 1
    assert num_chunks(3073) == 2
    assert num_chunks(10, chunk_size=3) == 4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_forward_features_and_head(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
    assert feats.shape == (2, 64)
    assert out.shape == (2, 10)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (64, 10)
    assert model.head.bias is not None
    torch.testing.assert_close(out, model.head(feats))
    # The head is the last layer of the flat vector.
    assert trainable_params(model)[-1] is model.head.bias


def test_unknown_model_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        build_model("nope", 10)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["cnn", "resnet10"])
def test_flat_round_trip_changes_output(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    flat = torch.randn(num_trainable(model))
    load_flat_(model, flat)
    assert torch.equal(flatten_params(model), flat)
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    # The flat vector is a copy, not a view of the parameters.
    snapshot = flatten_params(model)
    snapshot.zero_()
    assert torch.equal(flatten_params(model), flat)


def test_load_flat_accepts_numpy() -> None:
    model = build_model("cnn", 10)
    arr = np.random.default_rng(0).standard_normal(num_trainable(model))
    load_flat_(model, arr.astype(np.float32))
    assert np.array_equal(flatten_params(model).numpy(), arr.astype(np.float32))
    load_flat_(model, arr)  # float64 is cast to float32
    assert torch.equal(flatten_params(model), torch.from_numpy(arr).float())


def test_load_flat_errors() -> None:
    model = build_model("cnn", 10)
    k = num_trainable(model)
    with pytest.raises(ValueError, match=f"expected {k}, received {k - 1}"):
        load_flat_(model, torch.zeros(k - 1))
    with pytest.raises(ValueError, match="floating"):
        load_flat_(model, torch.zeros(k, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating"):
        load_flat_(model, np.zeros(k, dtype=np.int32))


def test_buffers_excluded_from_flat_but_round_trip() -> None:
    torch.manual_seed(0)
    model = build_model("resnet10", 10)
    buffer_count = sum(b.numel() for b in model.buffers())
    assert buffer_count > 0
    assert flatten_params(model).numel() == num_trainable(model)
    assert num_trainable(model) == sum(p.numel() for p in model.parameters())

    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # update BN running statistics
    state = buffer_state(model)
    assert "stem.1.running_mean" in state
    assert "stem.1.num_batches_tracked" in state
    assert int(state["stem.1.num_batches_tracked"]) == 1

    fresh = build_model("resnet10", 10)
    load_flat_(fresh, flatten_params(model))
    load_buffer_state_(fresh, state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    for name, value in buffer_state(fresh).items():
        assert np.array_equal(value, state[name])
    # Loading flat parameters leaves the buffers untouched.
    load_flat_(fresh, torch.zeros(num_trainable(fresh)))
    assert np.array_equal(
        buffer_state(fresh)["stem.1.running_var"], state["stem.1.running_var"]
    )


def test_load_buffer_state_errors() -> None:
    model = build_model("resnet10", 10)
    state = buffer_state(model)
    missing = dict(state)
    missing.pop("stem.1.running_mean")
    with pytest.raises(ValueError, match="stem.1.running_mean"):
        load_buffer_state_(model, missing)
    with pytest.raises(ValueError, match="bogus"):
        load_buffer_state_(model, {**state, "bogus": np.zeros(1)})
    bad_shape = {**state, "stem.1.running_var": np.zeros(3, dtype=np.float32)}
    with pytest.raises(ValueError, match="shape"):
        load_buffer_state_(model, bad_shape)


def test_cli_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--classes", "10"])
    out = capsys.readouterr().out
    for name, (k10, _, n10, _) in EXPECTED.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert f"{k10:,}" in line
        assert str(n10) in line.split()
        assert f"{n10 * (128 * 3072 + 3072):,}" in line
