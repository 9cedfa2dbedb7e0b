"""Run-config ``bn-eval``: BatchNorm statistics recalibrated for evaluation only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client_app.local import BUFFERS_KEY
from client_app.training import recalibrate_batchnorm
from common.config import ConfigError, load_run_config
from tests.helpers import base_config, run, write_learnable_imagefolder


def test_recalibrate_batchnorm_by_hand():
    """Cumulative average of per-batch means and unbiased variances."""
    bn = nn.BatchNorm2d(1)
    bn.running_mean.fill_(7.0)
    model = nn.Sequential(bn)
    # Two batches of two 1x1 images: [1, 3] and [2, 6].
    x = torch.tensor([1.0, 3.0, 2.0, 6.0]).view(4, 1, 1, 1)
    assert recalibrate_batchnorm(model, x, batch_size=2)
    # means 2 and 4 -> 3; unbiased variances 2 and 8 -> 5.
    assert bn.running_mean.item() == pytest.approx(3.0)
    assert bn.running_var.item() == pytest.approx(5.0)
    assert bn.momentum == 0.1 and not model.training
    plain = nn.Sequential(nn.Conv2d(1, 1, 1))
    assert not recalibrate_batchnorm(plain, x)


def test_bn_eval_rejects_unknown_values():
    with pytest.raises(ConfigError, match="'bn-eval' = 'fresh'.*stored.*recalibrate"):
        load_run_config({"bn-eval": "fresh"})


def test_recalibration_changes_the_evaluation_only(tmp_path):
    """Same seeded run both ways: identical training and kept BatchNorm
    statistics, different evaluation. With ``hn-update = "mean"`` round 1's
    evaluation rides on round 2's train message, before training from the
    statistics the client kept."""
    folder = write_learnable_imagefolder(tmp_path / "folder", 6, 24)
    runs = {}
    for mode in ("stored", "recalibrate", "both"):
        config = base_config(folder, tmp_path / mode, models="resnet10,cnn")
        config |= {
            "bn-eval": mode,
            "num-server-rounds": 2,
            "hn-update": "mean",
            "run-name": mode,
        }
        _, grid, _, rows = run(config, 3)
        kept = {
            name: context.state[BUFFERS_KEY]["blocks.0.bn1.running_mean"].numpy()
            for name, context in grid.contexts.items()
            if BUFFERS_KEY in context.state
            and "blocks.0.bn1.running_mean" in context.state[BUFFERS_KEY]
        }
        assert kept
        runs[mode] = (rows, kept)
    (stored, kept_s), (recal, kept_r) = runs["stored"], runs["recalibrate"]
    both, kept_b = runs["both"]
    assert [r["train_loss"] for r in stored] == [r["train_loss"] for r in recal]
    assert [r["train_loss"] for r in stored] == [r["train_loss"] for r in both]
    assert kept_s.keys() == kept_r.keys() == kept_b.keys()
    for name in kept_s:
        np.testing.assert_array_equal(kept_s[name], kept_r[name])
        np.testing.assert_array_equal(kept_s[name], kept_b[name])
    assert [r["loss"] for r in stored] != [r["loss"] for r in recal]
    # "both": the stored reading as accuracy, the recalibrated one beside it (the
    # cnn client, without BatchNorm, counts the same in both).
    assert [r["accuracy"] for r in both] == [r["accuracy"] for r in stored]
    assert [r["accuracy_recalibrated"] for r in both] == [r["accuracy"] for r in recal]
    assert "accuracy_recalibrated" not in stored[0]
