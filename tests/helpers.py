"""Helpers shared by test modules (fixtures live in conftest.py).

- data writers: a learnable image folder, learnable MNIST idx files, and idx files
  in the official encoding;
- in-process runs: :func:`base_config` and :func:`run` (the server loop with the
  real ClientApp through :class:`tests.inprocess_grid.InProcessGrid`);
- train replies for validation tests: :func:`registry`, :func:`reply`,
  :func:`snapshot`, :func:`assert_same`, :func:`apply`.
"""

from __future__ import annotations

import copy
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from common import protocol as P
from common.config import load_run_config
from server_app.engine.loop import Engine
from server_app.engine.registry import ClientInfo, ClientRegistry
from server_app.engine.replies import Reply, ReplyCheck
from server_app.results import RunResults
from server_app.strategies import build_strategy
from tests.inprocess_grid import InProcessGrid


# -- data ------------------------------------------------------------------------------
def write_learnable_imagefolder(root: Path, classes: int, per_class: int) -> Path:
    """Class c: a noisy image whose colour and stripe depend on c (learnable)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"class{c:02d}"
        folder.mkdir(parents=True)
        base = np.zeros((32, 32, 3), np.float32)
        base[..., c % 3] = 160
        base[(c * 3) % 32 : (c * 3) % 32 + 4, :, :] = 255
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """The official idx encoding: 0, 0, 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return header + dims + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write ``array`` as an idx file at ``path`` (``path.gz`` gzipped if ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(idx_bytes(array))
    else:
        path.write_bytes(idx_bytes(array))
    return path


def write_learnable_mnist(root: Path, per_class: int = 60) -> Path:
    """MNIST idx files (the official format) whose classes are learnable stripes."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, c * 2 : c * 2 + 4, :] = 255
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images, gz=True)
    write_idx(raw / "train-labels-idx1-ubyte", labels.astype(np.uint8), gz=True)
    return root


def label_prior_accuracy(
    folder: Path, num_clients: int, classes_per_client: int = 2, seed: int = 42
) -> float:
    """Test accuracy of every client always answering its most frequent train class,
    on the image folder ``folder`` split as a run splits it (pathological partition):
    what a model that learnt only its client's label prior reaches."""
    from common.data import load_client_data

    correct = total = 0
    for pid in range(num_clients):
        data = load_client_data(
            "imagefolder", folder, pid, num_clients, "pathological",
            classes_per_client, 0.1, seed,
        )  # fmt: skip
        majority = torch.bincount(data.train_y).argmax()
        correct += int((data.test_y == majority).sum())
        total += data.num_test
    return correct / total


# -- in-process runs -------------------------------------------------------------------
def run(config: dict, num_nodes: int, strategy=None, engine=Engine, **grid_kwargs):
    """Run ``config`` with ``num_nodes`` in-process nodes (the ``engine`` class
    running the ``strategy`` class); return the algorithm, the grid, the results
    and the rows of ``metrics.jsonl``."""
    cfg = load_run_config(config)
    grid = InProcessGrid(config, num_nodes, **grid_kwargs)
    strategy = strategy.from_config(cfg) if strategy else build_strategy(cfg)
    results = RunResults.create(cfg)
    engine(strategy, cfg).start(grid, results)
    results.finish()
    rows = [
        json.loads(x) for x in (results.path / "metrics.jsonl").read_text().splitlines()
    ]
    return strategy, grid, results, rows


def base_config(folder: Path, tmp_path: Path, **extra) -> dict:
    """A small run on the image folder ``folder`` (3 rounds, chunk size 1024)."""
    return {
        "dataset": "imagefolder",
        "data-dir": str(folder),
        "results-dir": str(tmp_path),
        "num-server-rounds": 3,
        "chunk-size": 1024,
        **extra,
    }


# -- train replies for validation tests ------------------------------------------------
#: Parameter counts and node ids of the two clients of :func:`registry`.
SIZES = {"a": 50, "b": 70}
NODES = {"a": 11, "b": 12}


def registry() -> ClientRegistry:
    return ClientRegistry(
        ClientInfo(name, NODES[name], k, 10, 5, 3, 1) for name, k in SIZES.items()
    )


def reply(
    name: str = "a",
    node: int | None = None,
    delta: object = "good",
    metrics: dict | None = None,
    claimed: str | None = None,
    error: bool = False,
) -> Message:
    """A train reply from client ``name`` (a small good delta unless told)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    sent = Message(
        RecordDict(),
        dst_node_id=NODES.get(name, 99) if node is None else node,
        message_type=MessageType.TRAIN,
    )
    if error:
        return Message(Error(code=0, reason="boom"), reply_to=sent)
    content = RecordDict(
        {
            P.INFO: ConfigRecord({P.CLIENT_NAME: claimed or name}),
            P.METRICS: MetricRecord(
                metrics
                if metrics is not None
                else {P.NUM_EXAMPLES: 10, P.LOSS: 1.0, P.SECONDS: 0.1}
            ),
        }
    )
    if isinstance(delta, str) and delta == "good":
        delta = np.full(SIZES.get(name, 50), 0.01, np.float32)
    if delta is not None:
        content[P.ARRAYS] = ArrayRecord({P.DELTA: Array(np.asarray(delta))})
    return Message(content, reply_to=sent)


def snapshot(strategy):
    """The hypernetwork's parameters and the optimizer's state, copied."""
    return (
        {k: v.clone() for k, v in strategy.hn.state_dict().items()},
        copy.deepcopy(strategy.optimizer.state_dict()),
    )


def assert_same(before, after) -> None:
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    old, new = before[1]["state"], after[1]["state"]
    assert old.keys() == new.keys()
    for index, entry in old.items():
        for name, value in entry.items():
            assert torch.equal(value, new[index][name]), (index, name)


def checker(strategy, cfg=None) -> ReplyCheck:
    """The engine's reply validation for ``strategy`` under ``cfg`` (default: the
    defaults) (``rejected`` counts)."""
    return Engine(strategy, cfg or load_run_config({"strategy": strategy.name})).check


def validate(
    strategy, messages, clients=None, cfg=None
) -> tuple[list[Reply], ReplyCheck]:
    """Round-1 train replies ``messages`` as the engine accepts them (from the
    clients of :func:`registry` unless told) under ``cfg``, and the check that
    counted."""
    check = checker(strategy, cfg)
    check.server_round = 1
    return check.messages(clients or registry(), messages, "train"), check


def validated(strategy, pairs) -> tuple[list[Reply], ReplyCheck]:
    """``(client, content)`` train replies as the engine accepts them."""
    check = checker(strategy)
    replies = [check.content(client, content, "train") for client, content in pairs]
    return [r for r in replies if r is not None], check


def apply(strategy, message, mode: str, cfg=None) -> ReplyCheck:
    """Validate ``message`` as a round-1 train reply and apply what passes, one
    reply at a time (``sequential``) or as a round's batch (``mean``); return
    the check (its ``rejected`` counts the rejections)."""
    valid, check = validate(strategy, [message], cfg=cfg)
    if mode == "sequential":
        for reply in valid:
            strategy.apply_train_reply(1, reply)
    elif valid:
        strategy.apply_train_replies(1, valid)
    return check
