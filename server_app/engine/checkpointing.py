"""The engine's side of checkpoints: what goes into ``checkpoint.pt`` and how a
resumed run rebuilds its registry and state from it (the file format and its
atomic write are :mod:`server_app.checkpoint`)."""

from __future__ import annotations

import time
import uuid
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from common import protocol as P

from ..checkpoint import CHECKPOINT_FILE, FORMAT, write_checkpoint
from .registry import ClientInfo, ClientRegistry

if TYPE_CHECKING:
    from ..results import RunResults
    from .loop import Engine


def lineage(checkpoint: dict[str, Any] | None) -> dict[str, str | int]:
    """The run's key (new for a fresh run, the checkpoint's for a resumed one) and
    the round it resumed after: clients restore saved state of this run only."""
    if checkpoint is None:
        return {P.RUN_KEY: uuid.uuid4().hex, P.RESUMED_AT: 0}
    key = checkpoint.get("run-key") or uuid.uuid4().hex
    return {P.RUN_KEY: key, P.RESUMED_AT: int(checkpoint["round"])}


def state_dict(engine: Engine) -> dict[str, Any]:
    """Random generators, then the algorithm's ``state_dict``."""
    return {
        "rng": engine.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        **engine.algorithm.state_dict(),
    }


def save_if_due(engine: Engine, results: RunResults, server_round: int) -> None:
    """Write ``checkpoint.pt`` when ``checkpoint-every`` says so (training only)."""
    every, last = engine.cfg.checkpoint_every, engine.cfg.num_server_rounds
    due = server_round % every == 0 or server_round == last if every else False
    if not due or engine.progress.phase != "train":
        return
    start = time.perf_counter()
    write_checkpoint(
        results.path / CHECKPOINT_FILE,
        {
            "format": FORMAT,
            "strategy": engine.algorithm.name,
            "config": engine.cfg.flat(),
            "round": server_round,
            "run-key": engine.lineage[P.RUN_KEY],
            "waiting": engine.carry.waiting,
            "metrics": list(results.records),
            "clients": [
                {k: v for k, v in c.to_json().items() if k != "node_id"}
                for c in engine.clients
            ],
            "state": state_dict(engine),
        },
    )
    log(INFO, "round %d: checkpoint written in %.2f s", server_round,
        time.perf_counter() - start)  # fmt: skip


def restore(engine: Engine, checkpoint: dict[str, Any]) -> None:
    """Rebuild the registry and the state of a checkpoint, then add newcomers.

    Clients of the checkpoint take the node ids of the live handshake; one that
    is not connected keeps its state and waits (node id 0) until it reconnects.
    A live client the checkpoint does not know joins fresh, after the state is
    loaded, so saved state is matched by name only.
    """
    saved = ClientRegistry(
        ClientInfo(**(c | {"node_id": 0})) for c in checkpoint["clients"]
    )
    live = engine.clients
    newcomers = [c for c in live if c.name not in saved]
    saved.merge(ClientRegistry(c for c in live if c.name in saved), set())
    engine.clients = saved
    engine.algorithm.start(saved)
    state = checkpoint["state"]
    engine.rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    engine.algorithm.load_state_dict(state)
    for info in newcomers:
        saved.add(info)
        engine.algorithm.register(info.name, info.num_params)
    absent = [c.name for c in saved if c.node_id == 0]
    if absent:
        log(WARNING, "resumed without clients %s; they rejoin when they "
            "reconnect", absent)  # fmt: skip
