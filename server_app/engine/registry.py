"""The handshake and the client registry, keyed by client name.

Before round 1 the server sends a QUERY to every connected node; each reply
carries the client's stable name, its trainable parameter count ``K_i`` and its
example counts. Node ids are only addresses (they change when a SuperNode
restarts), so every piece of server state is keyed by name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P

from .exchange import error_text, exchange


class HandshakeError(RuntimeError):
    """The federation could not be formed; the message says which client and why."""


@dataclass
class ClientInfo:
    """What the server knows about one client (never its architecture)."""

    name: str
    node_id: int
    num_params: int
    num_train: int
    num_test: int
    num_classes: int
    in_channels: int
    novel: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def natural_key(name: str) -> list:
    """Sort key putting ``client-2`` before ``client-10`` (digit runs as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ClientRegistry:
    """Clients by name, with the node id each one currently answers from."""

    def __init__(self, clients: Iterable[ClientInfo] = ()) -> None:
        self._by_name: dict[str, ClientInfo] = {}
        for info in clients:
            self.add(info)

    def add(self, info: ClientInfo) -> None:
        if info.name in self._by_name:
            other = self._by_name[info.name]
            raise HandshakeError(
                f"two nodes ({other.node_id} and {info.node_id}) claim the client "
                f"name '{info.name}'; every SuperNode needs its own client-name"
            )
        self._by_name[info.name] = info

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self):
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> ClientInfo:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        """Client names in a stable order (sorted)."""
        return sorted(self._by_name)

    def name_of(self, node_id: int) -> str | None:
        for info in self._by_name.values():
            if info.node_id == node_id:
                return info.name
        return None

    def merge(self, joined: ClientRegistry, live_nodes: set[int]) -> list[ClientInfo]:
        """Take in clients that answered a later handshake; return the new ones.

        A known name whose old node is gone reconnected: it keeps its entry (and
        so its server state) under the new node id. A known name whose old node
        is still connected is refused (logged): two live nodes cannot share a
        name. A known name reporting another parameter count is refused too.
        """
        new = []
        for info in joined:
            known = self._by_name.get(info.name)
            if known is None:
                self._by_name[info.name] = info
                new.append(info)
            elif known.node_id in live_nodes:
                log(
                    WARNING,
                    "node %s claims client name '%s', which node %s still "
                    "holds; refused",
                    info.node_id,
                    info.name,
                    known.node_id,
                )
            elif known.num_params != info.num_params:
                log(
                    WARNING,
                    "client '%s' reconnected from node %s with %d parameters "
                    "instead of %d; refused",
                    info.name,
                    info.node_id,
                    info.num_params,
                    known.num_params,
                )
            else:
                log(
                    INFO,
                    "client '%s' reconnected from node %s (was %s)",
                    info.name,
                    info.node_id,
                    known.node_id,
                )
                known.node_id = info.node_id
        return new


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (or fail after timeout)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise HandshakeError(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s; "
                f"run-config min-clients = {min_nodes}"
            )
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), min_nodes)
        time.sleep(1.0)
    return nodes


def handshake(
    grid: Grid, node_ids: list[int], timeout: float, lineage: dict[str, str | int]
) -> ClientRegistry:
    """Query every node (``lineage``: the run's key and resume round, for the
    client's saved state); build the registry or raise with every client's error."""
    messages = [
        Message(
            RecordDict({P.CONFIG: ConfigRecord(dict(lineage))}),
            dst_node_id=node_id,
            message_type=MessageType.QUERY,
        )
        for node_id in node_ids
    ]
    replies = exchange(grid, messages, timeout)
    errors, clients = [], []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            errors.append(f"node {node_id}: {error_text(reply)}")
            continue
        content = reply.content
        try:
            metrics = content[P.METRICS]
            info = ClientInfo(
                name=P.check_client_name(str(content[P.INFO][P.CLIENT_NAME])),
                node_id=node_id,
                num_params=int(metrics[P.NUM_PARAMS]),
                num_train=int(metrics[P.NUM_TRAIN]),
                num_test=int(metrics[P.NUM_TEST]),
                num_classes=int(metrics[P.NUM_CLASSES]),
                in_channels=int(metrics[P.IN_CHANNELS]),
                novel=bool(metrics.get(P.NOVEL, 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            errors.append(f"node {node_id}: malformed handshake reply ({err})")
            continue
        clients.append(info)
    missing = len(node_ids) - len(replies)
    if missing:
        errors.append(f"{missing} node(s) did not answer within {timeout:.0f} s")
    tasks = {(c.num_classes, c.in_channels) for c in clients}
    if len(tasks) > 1:
        errors.append(
            "clients disagree on the task (classes, channels): "
            + ", ".join(f"{c.name}={c.num_classes},{c.in_channels}" for c in clients)
        )
    if errors:
        raise HandshakeError("handshake failed: " + "; ".join(errors))
    return ClientRegistry(sorted(clients, key=lambda c: c.name))
