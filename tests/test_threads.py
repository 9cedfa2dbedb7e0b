"""Intra-op threads of client messages (run-config ``client-threads``) and the
OpenMP wait policy the apps ask for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from common.threads import intra_op_threads, one_thread


def test_intra_op_threads_sets_and_restores():
    before = torch.get_num_threads()
    with intra_op_threads(0):
        assert torch.get_num_threads() == before
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, 1])
def test_client_messages_run_on_client_threads(tmp_path, monkeypatch, threads):
    import client_app.trainers.base as base
    from tests.helpers import base_config, run, write_learnable_imagefolder

    seen = []
    original = base.train_local

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "train_local", recording)
    before = torch.get_num_threads()
    folder = write_learnable_imagefolder(tmp_path / "folder", 4, 12)
    config = base_config(folder, tmp_path, **{"num-server-rounds": 1,
                                              "client-threads": threads})  # fmt: skip
    run(config, 2)
    assert seen == [threads or before] * 2
    assert torch.get_num_threads() == before


def test_the_apps_ask_for_passive_openmp_threads_before_torch_loads():
    code = (
        "import os, sys, client_app, server_app; "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert out.stdout.split() == ["PASSIVE", "False"]
    # a user's own choice is kept
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert out.stdout.split() == ["ACTIVE", "False"]
