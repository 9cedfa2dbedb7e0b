"""Reply validation, once for every algorithm, and the round summaries.

A reply is accepted when it is not an error, comes from the node of a known
client that names itself correctly, carries the metrics of its kind (finite,
>= 0) and, for training, every array the algorithm declares for that client
(:meth:`~server_app.strategies.base.Algorithm.expects`) in the declared form. A
rejected reply is logged with client, round and reason, counted
(``rejected_replies``) and changes nothing: algorithms only see accepted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log

from common import protocol as P
from common.config import RunConfig
from common.transfer import check_dense, decode_update, update_keys

from .costs import Costs
from .exchange import error_text
from .registry import ClientInfo, ClientRegistry


@dataclass(frozen=True)
class Dense:
    """A finite floating array of ``shape`` (``None``: any shape; a ``None``
    entry: any size on that axis), kept as float32. ``delta``: its L2 norm must
    not exceed ``max-delta-norm`` (when set). ``integer``: an integer array
    instead (no other check)."""

    shape: tuple[int | None, ...] | None = None
    delta: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Update:
    """A delta of ``length`` values in the run's ``transfer`` encoding under base
    key ``key`` (:func:`common.transfer.decode_update`), rebuilt dense float32;
    its L2 norm must not exceed ``max-delta-norm`` (when set)."""

    length: int


Expect = Dense | Update


@dataclass
class Reply:
    """An accepted reply: who sent it, its arrays as declared, its metrics."""

    client: ClientInfo
    metrics: MetricRecord
    arrays: dict[str, Any] = field(default_factory=dict)
    carried: MetricRecord | None = None  # the evaluation a train reply carries

    @property
    def num_examples(self) -> int:
        """Training examples the reply reports (its aggregation weight)."""
        return int(self.metrics[P.NUM_EXAMPLES])


#: Metrics a reply must carry (finite, non-negative), by message kind.
REQUIRED_METRICS: dict[str, tuple[str, ...]] = {
    "train": (P.NUM_EXAMPLES, P.LOSS, P.SECONDS),
    "evaluate": (P.NUM_EXAMPLES, P.CORRECT, P.LOSS),
}


def metrics_problem(metrics: Any, kind: str) -> str | None:
    """Why ``metrics`` of a ``kind`` reply are unusable, or ``None``."""
    for key in REQUIRED_METRICS[kind]:
        value = metrics.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"metric '{key}' is missing or not a number ({value!r})"
        if not np.isfinite(value) or value < 0:
            return f"metric '{key}' = {value} must be finite and >= 0"
    if kind != "train" and P.CORRECT_RECALIBRATED in metrics:
        value, n = metrics[P.CORRECT_RECALIBRATED], metrics[P.NUM_EXAMPLES]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric '{P.CORRECT_RECALIBRATED}' is not a number"
        if not 0 <= value <= n:
            return f"metric '{P.CORRECT_RECALIBRATED}' = {value} not in [0, {n}]"
    return None


def read_array(content: RecordDict, key: str, spec: Expect, cfg: RunConfig) -> Any:
    """Array ``key`` of ``content`` as ``spec`` declares it; ``ValueError`` naming
    what is wrong otherwise."""
    if isinstance(spec, Update):
        record = content.array_records.get(P.ARRAYS)
        if record is None:
            raise ValueError(f"no '{P.ARRAYS}' record")
        mode = cfg.transfer
        try:
            arrays = {
                n: record[n].numpy() for n in update_keys(key, mode) if n in record
            }
            value = decode_update(arrays, key, spec.length, mode, cfg.topk_fraction)
        except TypeError as err:
            raise ValueError(str(err)) from err
        return within_norm(key, value, cfg.max_delta_norm)
    try:
        value = content[P.ARRAYS][key].numpy()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"no usable array '{key}' ({err})") from err
    if spec.integer:
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"array '{key}' has dtype {value.dtype}; expected integer")
        return value
    shape = spec.shape
    if shape is not None and None in shape:
        fits = value.ndim == len(shape) and all(
            s is None or s == v for s, v in zip(shape, value.shape, strict=True)
        )
        shape = value.shape if fits else shape
    value = check_dense(value, key, shape)
    return within_norm(key, value, cfg.max_delta_norm) if spec.delta else value


def within_norm(key: str, value: np.ndarray, limit: float | None) -> np.ndarray:
    """``value`` if its L2 norm is at most ``limit`` (when set)."""
    if limit and (norm := float(np.linalg.norm(value))) > limit:
        raise ValueError(
            f"array '{key}' has norm {norm:.4g} > max-delta-norm = {limit}"
        )
    return value


class ReplyCheck:
    """Validates replies for the engine; :attr:`rejected` counts the round's
    rejections.

    Parameters
    ----------
    cfg : RunConfig
        For ``transfer``, ``topk-fraction`` and ``max-delta-norm``.
    costs : Costs
        Counts the bytes and client compute of every reply that passes the
        identity and metric checks.
    expects : callable
        ``client -> {array name: Dense | Update}`` for train replies.
    read : callable
        ``(client, arrays) -> arrays``: the algorithm's reading of the declared
        arrays; a ``ValueError`` rejects the reply.
    """

    def __init__(
        self,
        cfg: RunConfig,
        costs: Costs,
        expects: Callable[[ClientInfo], dict[str, Expect]],
        read: Callable[[ClientInfo, dict[str, Any]], dict[str, Any]],
    ) -> None:
        self.cfg, self.costs = cfg, costs
        self.expects, self.read = expects, read
        self.rejected = 0
        self.server_round = 0

    def reject(self, name: str, kind: str, reason: str) -> None:
        """Log and count one rejected reply."""
        self.rejected += 1
        log(WARNING, "round %d: %s reply from %s rejected: %s", self.server_round,
            kind, name, reason)  # fmt: skip

    def messages(
        self, clients: ClientRegistry, replies: Iterable[Message], kind: str
    ) -> list[Reply]:
        """The accepted replies of ``replies`` (sorted by client name)."""
        valid = []
        for message in replies:
            node_id = message.metadata.src_node_id
            name = clients.name_of(node_id)
            if message.has_error():  # also the SuperLink's "node unavailable" ones
                self.reject(name or f"node {node_id}", kind, error_text(message))
                continue
            if name is None:
                self.reject(f"unknown node {node_id}", kind, "not in the registry")
                continue
            content = message.content
            try:
                claimed = str(content[P.INFO][P.CLIENT_NAME])
            except (KeyError, TypeError):
                claimed = None
            if claimed != name:
                self.reject(name, kind, f"it claims client name {claimed!r}, but "
                            f"node {node_id} belongs to '{name}'")  # fmt: skip
                continue
            reply = self.content(clients[name], content, kind)
            if reply is not None:
                valid.append(reply)
        # Replies arrive in any order; results must not depend on it.
        return sorted(valid, key=lambda r: r.client.name)

    def content(
        self, client: ClientInfo, content: RecordDict, kind: str
    ) -> Reply | None:
        """The reply ``client`` sent as ``content`` if its metrics (and, for
        training, its arrays) are usable; a carried evaluation with bad metrics
        is dropped from an otherwise good train reply."""
        try:
            metrics = content[P.METRICS]
        except (KeyError, TypeError):
            self.reject(client.name, kind, f"no '{P.METRICS}' record")
            return None
        if problem := metrics_problem(metrics, kind):
            self.reject(client.name, kind, problem)
            return None
        carried = content.metric_records.get(P.EVAL_METRICS)
        if carried is not None and (problem := metrics_problem(carried, "evaluate")):
            self.reject(client.name, "carried evaluation", problem)
            del content[P.EVAL_METRICS]
            carried = None
        self.costs.received(kind, content)
        reply = Reply(client, metrics, carried=carried)
        if kind != "train":
            return reply
        try:
            arrays = {
                key: read_array(content, key, spec, self.cfg)
                for key, spec in self.expects(client).items()
            }
            reply.arrays = self.read(client, arrays)
        except ValueError as err:
            self.reject(client.name, kind, str(err))
            return None
        return reply


def summarise_train(replies: list[Reply]) -> dict[str, float]:
    """Example-weighted train loss, client count, slowest client's seconds."""
    weights = [r.num_examples for r in replies]
    losses = [float(r.metrics[P.LOSS]) for r in replies]
    loss = float(np.average(losses, weights=weights)) if sum(weights) else np.nan
    return {
        "train_loss": loss,
        "train_clients": len(replies),
        "client_train_seconds": max(
            (float(r.metrics[P.SECONDS]) for r in replies), default=0.0
        ),
    }


def summarise_evaluation(
    replies: list[tuple[ClientInfo, MetricRecord]],
) -> dict[str, Any] | None:
    """Accuracy as total correct / total examples, plus the per-client view; with
    ``bn-eval = "both"`` also ``accuracy_recalibrated``.

    Summed in client-name order, so the loss does not depend on the order the
    replies came in."""
    if not replies:
        return None
    per_client, correct, total, loss_sum = {}, 0, 0, 0.0
    recalibrated, any_recalibrated = 0, False
    for client, m in sorted(replies, key=lambda item: item[0].name):
        n, c = int(m[P.NUM_EXAMPLES]), int(m[P.CORRECT])
        per_client[client.name] = c / n if n else 0.0
        correct, total, loss_sum = correct + c, total + n, loss_sum + m[P.LOSS] * n
        # A model without BatchNorm reads the same either way.
        any_recalibrated |= P.CORRECT_RECALIBRATED in m
        recalibrated += int(m.get(P.CORRECT_RECALIBRATED, c))
    summary = {
        "accuracy": correct / total if total else 0.0,
        "accuracy_mean": float(np.mean(list(per_client.values()))),
        "loss": loss_sum / total if total else float("nan"),
        "client_accuracy": dict(sorted(per_client.items())),
        "eval_clients": len(replies),
    }
    if any_recalibrated:
        summary["accuracy_recalibrated"] = recalibrated / total if total else 0.0
    return summary
