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
    num_chunks,
    num_trainable,
)
from common.models.__main__ import main

NAMES = ["cnn", "vgg8", "resnet10", "resnet12", "resnet18"]
"""The paper's five architectures (64-wide features, linear head)."""

EXTRA = [
    "mlp",
    "squeezenet1_0",
    "squeezenet1_1",
    "mobilenetv2",
    "shufflenetv2",
    "vit-tiny",
]
ALL_NAMES = NAMES + EXTRA

# name -> (K for 10 classes, K for 100 classes), 3 input channels
EXPECTED_EXTRA = {
    "mlp": (402_250, 408_100),
    "squeezenet1_0": (740_554, 786_724),
    "squeezenet1_1": (727_626, 773_796),
    "mobilenetv2": (700_490, 815_780),
    "shufflenetv2": (352_042, 444_292),
    "vit-tiny": (1_806_538, 1_823_908),
}
# name -> width of the (flat) features feeding a linear head
FEATURE_WIDTH = {"mlp": 64, "mobilenetv2": 1280, "shufflenetv2": 1024, "vit-tiny": 192}

# name -> (K for 10 classes, K for 100 classes, chunks 10, chunks 100)
EXPECTED = {
    "cnn": (234_006, 239_856, 77, 79),
    "vgg8": (268_814, 274_664, 88, 90),
    "resnet10": (347_178, 353_028, 114, 115),
    "resnet12": (523_242, 529_092, 171, 173),
    "resnet18": (565_386, 571_236, 185, 186),
}


def test_registry_lists_the_five_models_then_the_extras() -> None:
    assert available_models() == ALL_NAMES


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


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_forward_features_and_head(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    if name.startswith("squeezenet"):
        # No linear head: the final 1x1 conv, fed by the 512-channel map.
        assert isinstance(model.head, nn.Conv2d)
        assert (model.head.in_channels, model.head.out_channels) == (512, 10)
        assert feats.shape == (2, 512, 1, 1)
    else:
        width = FEATURE_WIDTH.get(name, 64)
        assert feats.shape == (2, width)
        assert isinstance(model.head, nn.Linear)
        assert (model.head.in_features, model.head.out_features) == (width, 10)
        torch.testing.assert_close(out, model.head(feats))
    assert model.head.bias is not None
    # The head is the last layer of the flat vector.
    assert trainable_params(model)[-1] is model.head.bias
    if name in EXTRA and in_channels == 3:
        # Training mode with a backward pass reaches every parameter.
        model.train()
        model(x).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        build_model("nope", 10)
    for name in ALL_NAMES:
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


def _cli_line(out: str, name: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(name + " "))


def test_cli_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--classes", "10"])
    out = capsys.readouterr().out
    for name, (k10, _, n10, _) in EXPECTED.items():
        line = _cli_line(out, name)
        assert f"{k10:,}" in line
        assert str(n10) in line.split()
        assert f"{n10 * (128 * 3072 + 3072):,}" in line
        assert line.split()[-1] == f"{n10 * (128 * 3072 + 3072) * 4 / 1e6:,.1f}"
    for name in EXTRA:
        assert f"{EXPECTED_EXTRA[name][0]:,}" in _cli_line(out, name)
    assert "MB" in out


# --- extra models -------------------------------------------------------------


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("classes", [10, 100])
def test_extra_trainable_counts(name: str, classes: int) -> None:
    k10, k100 = EXPECTED_EXTRA[name]
    model = build_model(name, classes)
    assert num_trainable(model) == (k10 if classes == 10 else k100)
    assert flatten_params(model).numel() == num_trainable(model)
    assert num_trainable(model) < 2_500_000


def test_mlp_count_by_hand() -> None:
    k = 3072 * 128 + 128 + 128 * 64 + 64 + 64 * 100 + 100
    assert k == 408_100
    assert num_trainable(build_model("mlp", 100)) == k
    assert num_trainable(build_model("mlp", 100, in_channels=1)) == k - 2048 * 128


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_squeezenet_matches_torchvision(version: str) -> None:
    from common.compat import import_torchvision

    tvm = import_torchvision().models
    torch.manual_seed(0)
    reference = getattr(tvm, f"squeezenet{version}")(num_classes=100).eval()
    model = build_model(f"squeezenet{version}", 100).eval()
    ref_names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == ref_names
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        assert model.features(x).shape == (2, 512, 1, 1)
    assert isinstance(model.head, nn.Conv2d)
    assert (model.head.in_channels, model.head.out_channels) == (512, 100)
    assert model.head is model.classifier[1]

    grey = build_model(f"squeezenet{version}", 100, in_channels=1)
    first, ref_first = grey.features[0], reference.features[0]
    assert first.in_channels == 1
    for attr in ("out_channels", "kernel_size", "stride", "padding"):
        assert getattr(first, attr) == getattr(ref_first, attr)
    removed = 2 * first.weight[:, 0].numel()  # two of three input channels
    assert num_trainable(grey) == num_trainable(reference) - removed


@pytest.mark.parametrize("name", ["mobilenetv2", "shufflenetv2"])
def test_cifar_stems_downsample_8x(name: str) -> None:
    model = build_model(name, 10, in_channels=1).eval()
    with torch.no_grad():
        fmap = model.body(torch.randn(2, 1, 32, 32))
    assert fmap.shape[-2:] == (4, 4)
