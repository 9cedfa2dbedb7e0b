"""Where a ClientApp message's seconds go, per model: the real handlers in-process.

Setting: MH-pFedHN, the paper's five models (``--models``, default all five), one
client of each (``--clients`` federation, default 10, clients split into model
blocks as in a run), the CIFAR-10 copy. The real ClientApp (``client_app.app``)
answers real Flower messages through :class:`tests.inprocess_grid.InProcessGrid`
(no transport), with what a simulation round sends every client: one EVALUATE
message (the previous round's ``theta``) and one TRAIN message (a fresh
``theta``), for ``--rounds`` rounds; round 1 is warm-up (the data are read and
cached then) and not shown.

Torch runs on ``--threads`` intra-op threads (default 1: what a simulated
ClientApp actor with ``client-resources-num-cpus = 1`` gets from Ray's
``OMP_NUM_THREADS``). The parts of a message are timed by wrapping the functions
that do them (wall-clock and the process's CPU time, all its threads):

- ``construct``: ``LocalClient.from_context`` whole (identity, cached data, the
  model and its seeded initialisation, BatchNorm state restored);
- ``model``: of which building the model (``build_model``, channels-last);
- ``load theta``: ``load_flat_`` of the received vector (both messages);
- ``train loop``: ``train_local``; ``eval loop``: ``evaluate_local``;
- ``delta``: ``flatten_params`` after training (``theta - trained`` follows);
- ``state``: BatchNorm buffers kept (``save_buffers``) and restored (the
  restore also counts in ``construct``);
- ``outside loops``: the message's CPU time minus its two loops.

    python -m bench.clientapp [--models cnn,vgg8,...] [--rounds 3] [--threads 1]
                              [--profile MODEL]

``--profile MODEL`` adds a torch.profiler table of one TRAIN message of that
model (operators by self CPU time).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import protocol as P

from .common import DEFAULT_OUT, print_table, write_json
from .sequential import app_config
from .simulation import default_data_dir

PAPER_MODELS = "cnn,vgg8,resnet10,resnet12,resnet18"


class Timers:
    """Wall-clock and process CPU seconds per named part, by the wrapped calls."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        func = getattr(owner, attr)

        @functools.wraps(func)
        def timed(*args, **kwargs):
            if self.depth[part]:  # a recursive or nested call: count once
                return func(*args, **kwargs)
            self.depth[part] += 1
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return func(*args, **kwargs)
            finally:
                self.wall[part] += time.perf_counter() - wall
                self.cpu[part] += time.process_time() - cpu
                self.depth[part] -= 1

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    @contextmanager
    def part(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu


def instrument(timers: Timers) -> None:
    """Wrap the functions whose seconds :func:`main` reports."""
    import client_app.local as local
    import client_app.trainers.base as base
    import client_app.trainers.delta as delta

    # Functions are looked up in the module that imported them.
    timers.wrap(local, "build_model", "model")
    timers.wrap(base, "load_flat_", "load theta")
    timers.wrap(base, "train_local", "train loop")
    timers.wrap(base, "evaluate_local", "eval loop")
    timers.wrap(delta, "flatten_params", "delta")
    timers.wrap(local.LocalClient, "restore_buffers", "state")
    timers.wrap(local.LocalClient, "save_buffers", "state")
    # construct: a classmethod, wrapped around its function
    original = local.LocalClient.from_context.__func__

    def from_context(cls, context, cfg):
        with timers.part("construct"):
            return original(cls, context, cfg)

    local.LocalClient.from_context = classmethod(from_context)


PARTS = ("construct", "model", "load theta", "state", "train loop", "eval loop",
         "delta")  # fmt: skip


def message(node_id: int, kind: str, theta: np.ndarray, rnd: int) -> Message:
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({P.THETA: Array(theta)}),
            P.CONFIG: ConfigRecord({P.ROUND: rnd}),
        }
    )
    return Message(content, dst_node_id=node_id, message_type=kind)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=PAPER_MODELS)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--profile", default="", help="a model to profile by op")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    from client_app.local import assign_model
    from common.models import build_model, num_trainable
    from tests.inprocess_grid import InProcessGrid

    from .round import parse_overrides

    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    config = app_config() | {
        "models": args.models,
        "data-dir": str(args.data_dir.resolve()),
        **parse_overrides(args.overrides),
    }
    grid = InProcessGrid(config, args.clients)
    nodes = {}  # model -> (node id, K): the first client of each model block
    for node_id, context in grid.contexts.items():
        pid = context.node_config["partition-id"]
        name = assign_model(pid, args.clients, models)
        if name not in nodes:
            nodes[name] = (node_id, num_trainable(build_model(name, 10)))
    timers = Timers()
    instrument(timers)
    rng = np.random.default_rng(0)
    rows = []
    for name, (node_id, k) in nodes.items():
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for rnd in range(1, args.rounds + 1):
            timers.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            for kind in (MessageType.EVALUATE, MessageType.TRAIN):
                theta = (rng.standard_normal(k) * 0.02).astype(np.float32)
                sent = message(node_id, kind, theta, rnd)
                (reply_id,) = grid.push_messages([sent])
                (reply,) = grid.pull_messages([reply_id])
                if reply.has_error():
                    raise RuntimeError(reply.error.reason)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if rnd == 1:
                continue
            totals["message"][0] += wall
            totals["message"][1] += cpu
            for part in PARTS:
                totals[part][0] += timers.wall.get(part, 0.0)
                totals[part][1] += timers.cpu.get(part, 0.0)
        kept = args.rounds - 1
        row: dict[str, Any] = {"model": name, "K": k}
        for part, (w, c) in totals.items():
            row[f"{part} ms"] = 1000 * w / kept
            row[f"{part} cpu ms"] = 1000 * c / kept
        row["outside loops cpu ms"] = (
            1000
            * (totals["message"][1] - totals["train loop"][1] - totals["eval loop"][1])
            / kept
        )
        rows.append(row)
        print(f"{name}: {row['message ms']:.0f} ms per round (2 messages)", flush=True)
    print(f"\nPer round of one client (EVALUATE + TRAIN), {args.threads} thread(s), "
          f"rounds 2-{args.rounds}; process CPU ms\n")  # fmt: skip
    print_table(
        rows,
        ["model", "K", "message cpu ms", "construct cpu ms", "model cpu ms",
         "load theta cpu ms", "state cpu ms", "train loop cpu ms", "eval loop cpu ms",
         "delta cpu ms", "outside loops cpu ms", "message ms"],
    )  # fmt: skip
    profile = None
    if args.profile:
        profile = profile_train(grid, nodes[args.profile], rng)
    payload = {"setting": {"clients": args.clients, "threads": args.threads,
                           "run_config": config}, "rows": rows}  # fmt: skip
    if profile:
        payload["profile"] = profile
    write_json(args.out, "clientapp", payload)
    return payload


def profile_train(grid, node: tuple[int, int], rng) -> str:
    """torch.profiler table of one TRAIN message (operators by self CPU)."""
    from torch.profiler import ProfilerActivity, profile

    node_id, k = node
    theta = (rng.standard_normal(k) * 0.02).astype(np.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (reply_id,) = grid.push_messages(
            [message(node_id, MessageType.TRAIN, theta, 99)]
        )
        grid.pull_messages([reply_id])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(table)
    return table


if __name__ == "__main__":
    main()
