"""Mixed-precision local training (run-config ``client-precision``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from client_app.training import LocalHParams, evaluate_local, train_local
from common.config import load_run_config
from common.models import build_model


class ConvOutputs:
    """Records the dtype of every convolution's output while active."""

    def __init__(self):
        self.dtypes: list[torch.dtype] = []

    def __enter__(self):
        def hook(module, _inputs, output):
            if isinstance(module, nn.Conv2d):
                self.dtypes.append(output.dtype)

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def batch(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    return x, torch.randint(0, 10, (n,), generator=g)


def trained(precision: str, model: nn.Module, x, y):
    model = copy.deepcopy(model)
    hparams = LocalHParams(batch_size=16, precision=precision)
    with ConvOutputs() as seen:
        stats = train_local(model, x, y, hparams, torch.Generator().manual_seed(1))
    return model, stats, seen.dtypes


@pytest.mark.parametrize("name", ["cnn", "resnet10"])
def test_bf16_trains_in_bfloat16_and_keeps_float32_weights(name):
    torch.manual_seed(0)
    model = build_model(name, 10).to(memory_format=torch.channels_last)
    x, y = batch()
    fp32, fp32_stats, fp32_seen = trained("fp32", model, x, y)
    bf16, bf16_stats, bf16_seen = trained("bf16", model, x, y)

    assert fp32_seen and set(fp32_seen) == {torch.float32}
    assert bf16_seen and set(bf16_seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    fp32_state, bf16_state = fp32.state_dict(), bf16.state_dict()
    assert all(bf16_state[k].dtype == v.dtype for k, v in fp32_state.items())

    # Same batches and starting weights: the two arithmetics take steps in nearly
    # the same direction, and not the same step.
    def step(trained_model):
        return torch.cat(
            [
                (p - q).detach().flatten()
                for p, q in zip(
                    trained_model.parameters(), model.parameters(), strict=True
                )
            ]
        )

    cosine = nn.functional.cosine_similarity(step(fp32), step(bf16), dim=0)
    assert cosine > 0.9
    assert not torch.equal(step(fp32), step(bf16))


def test_evaluation_stays_float32_after_bf16_training():
    torch.manual_seed(0)
    model = build_model("cnn", 10).to(memory_format=torch.channels_last)
    x, y = batch()
    bf16, _, _ = trained("bf16", model, x, y)
    with ConvOutputs() as seen:
        evaluate_local(bf16, x, y)
    assert seen.dtypes and set(seen.dtypes) == {torch.float32}


def test_the_run_config_reaches_the_clients_training(tmp_path):
    from tests.helpers import base_config, run, write_learnable_imagefolder

    folder = write_learnable_imagefolder(tmp_path / "folder", 4, 12)
    config = base_config(folder, tmp_path, **{"num-server-rounds": 1,
                                              "client-precision": "bf16"})  # fmt: skip
    assert load_run_config(config).client_precision == "bf16"
    with ConvOutputs() as seen:
        _, _, _, rows = run(config, 2)
    assert {torch.bfloat16, torch.float32} <= set(seen.dtypes)  # train, evaluate
    assert rows[-1]["accuracy"] >= 0


@pytest.mark.parametrize(("units", "warned"), [(False, True), (True, False)])
def test_bf16_without_bfloat16_units_is_logged_once(monkeypatch, caplog, units, warned):
    import logging

    import client_app.training as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units)
    monkeypatch.setattr(training.platform, "machine", lambda: "x86_64")
    training.warn_if_bf16_is_emulated.cache_clear()
    model = build_model("cnn", 10).to(memory_format=torch.channels_last)
    x, y = batch(n=16)
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            for _ in range(2):
                trained("bf16", model, x, y)
            trained("fp32", model, x, y)
    finally:
        training.warn_if_bf16_is_emulated.cache_clear()
    found = [r for r in caplog.records if "without bfloat16 units" in r.getMessage()]
    assert len(found) == (1 if warned else 0)
