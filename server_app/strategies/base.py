"""The round loop every strategy of this app shares.

:class:`HeteroStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy`
whose state lives in the strategy itself (a hypernetwork, prototypes, ...), not in
one global ``ArrayRecord``: the ``arrays`` argument of the Flower hooks is unused.
It adds what a personalised, model-heterogeneous run needs around the four hooks:

1. the handshake (:mod:`server_app.registry`) before round 1;
2. per-client train messages (each client gets its own payload) for a seeded
   sample of ``fraction-train`` of the clients;
3. evaluation of every client on its local test split every ``eval-every`` rounds
   and after the last round, written to the run's results directory; when every
   client trains next round, the evaluation rides on those messages
   (:meth:`carries_evaluation`).

A strategy implements :meth:`setup`, :meth:`train_payload` and
:meth:`apply_train_replies`, and may override :meth:`eval_payload` and
:meth:`train_phase` (to order its updates within a round).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol as P
from common.config import RunConfig
from common.transfer import check_dense, decode_update, update_keys

from ..checkpoint import (
    CHECKPOINT_FILE,
    FORMAT,
    holds_state_dict,
    load_optimizer,
    pack,
    pack_optimizer,
    unpack,
    write_checkpoint,
)
from ..exchange import error_text, exchange
from ..registry import (
    ClientInfo,
    ClientRegistry,
    HandshakeError,
    handshake,
    wait_for_nodes,
)
from ..results import (
    RunResults,
    format_bytes,
    format_duration,
    server_memory_mb,
)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data in a message (what dominates its size on the wire)."""
    return sum(
        len(array.data)
        for record in content.array_records.values()
        for array in record.values()
    )


class HeteroStrategy(Strategy):
    """Base of every strategy: handshake, sampling, per-client messages, results.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    """

    #: Name under which the strategy is registered (``strategy = "<name>"``).
    name: ClassVar[str] = ""
    #: Attributes that hold learned or random state, saved in checkpoints
    #: (modules by ``state_dict``, optimizers by parameter name, arrays,
    #: generators, values).
    checkpoint_attributes: ClassVar[tuple[str, ...]] = ()
    #: Optimizer attribute -> attribute of the module whose ``named_parameters``
    #: name its parameters (the checkpoint keys its state by those names).
    optimizer_modules: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.clients = ClientRegistry()
        self.start_costs()
        self.last_train_metrics: dict[str, float] = {}
        self.last_eval: dict[str, Any] | None = None
        self.carried_eval: dict[str, Any] | None = None
        self.evaluate_first = False
        self.phase = "train"  # or "novel": clients that join after training
        self._refused_nodes: set[int] = set()
        self.last_round = cfg.num_server_rounds
        self.current_round = 0
        self.rejected = 0  # replies rejected in the current round
        self.round_times: dict[str, list[float]] = {}  # per phase, for the ETA

    # -- what a strategy implements ----------------------------------------------
    @abstractmethod
    def setup(self, clients: ClientRegistry) -> None:
        """Build the server state for the registered clients (before round 1)."""

    @abstractmethod
    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Records sent to ``client`` for training (``config`` is added here)."""

    @abstractmethod
    def apply_train_replies(
        self, server_round: int, replies: list[tuple[ClientInfo, RecordDict]]
    ) -> None:
        """Update the server state from the successful train replies."""

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Records sent to ``client`` for evaluation (default: same as training)."""
        return self.train_payload(client, server_round)

    def reply_array(
        self,
        client: ClientInfo,
        content: RecordDict,
        key: str,
        shape: tuple[int, ...] | None = None,
        update: bool = False,
    ) -> np.ndarray | None:
        """Array ``key`` of a reply as float32, or ``None`` (logged, counted).

        Rejected: a missing array, a non-floating dtype, a shape other than
        ``shape`` (when given), NaN or Inf (:func:`common.transfer.check_dense`),
        and for an ``update`` (a delta) an L2 norm above ``max-delta-norm`` (when
        set). Nothing of the server state is touched here, so a rejected reply
        changes nothing.
        """
        try:
            value = content[P.ARRAYS][key].numpy()
        except (KeyError, TypeError, ValueError) as err:
            self.reject(client.name, "train", f"no usable array '{key}' ({err})")
            return None
        try:
            value = check_dense(value, key, shape)
        except ValueError as err:
            self.reject(client.name, "train", str(err))
            return None
        return self.within_norm(client, key, value) if update else value

    def reply_update(
        self, client: ClientInfo, content: RecordDict, key: str, length: int
    ) -> np.ndarray | None:
        """The update (a delta) of ``length`` values sent under base key ``key``
        in the run's ``transfer`` encoding, as dense float32, or ``None`` (logged,
        counted).

        Rejected: whatever :func:`common.transfer.decode_update` refuses (missing
        arrays, wrong dtypes or lengths, NaN or Inf, bad sparse indices, more than
        ``k`` sparse entries), and an L2 norm of the rebuilt dense delta above
        ``max-delta-norm``. A rejected reply changes nothing.
        """
        mode = self.cfg.transfer
        record = content.array_records.get(P.ARRAYS)
        if record is None:
            self.reject(client.name, "train", f"no '{P.ARRAYS}' record")
            return None
        try:
            arrays = {
                n: record[n].numpy() for n in update_keys(key, mode) if n in record
            }
            value = decode_update(arrays, key, length, mode, self.cfg.topk_fraction)
        except (TypeError, ValueError) as err:
            self.reject(client.name, "train", str(err))
            return None
        return self.within_norm(client, key, value)

    def within_norm(
        self, client: ClientInfo, key: str, value: np.ndarray
    ) -> np.ndarray | None:
        """``value`` if its L2 norm is at most ``max-delta-norm`` (when set), else
        ``None`` (logged, counted)."""
        limit = self.cfg.max_delta_norm
        if limit and (norm := float(np.linalg.norm(value))) > limit:
            self.reject(
                client.name,
                "train",
                f"array '{key}' has norm {norm:.4g} > max-delta-norm = {limit}",
            )
            return None
        return value

    @staticmethod
    def num_examples(content: RecordDict) -> int:
        """Training examples a reply reports (its aggregation weight)."""
        return int(content[P.METRICS][P.NUM_EXAMPLES])

    def client_details(self, client: ClientInfo) -> dict[str, Any]:
        """Extra per-client fields for ``clients.json`` (e.g. chunks and head)."""
        return {}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "Strategy %s with %d clients", self.name, len(self.clients))

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Random generators and every attribute in :attr:`checkpoint_attributes`."""
        state = {
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        for attr in self.checkpoint_attributes:
            value = getattr(self, attr)
            if attr in self.optimizer_modules:
                module = getattr(self, self.optimizer_modules[attr])
                keep = self.cfg.checkpoint_optimizer
                state[attr] = pack_optimizer(value, module) if keep else None
            else:
                state[attr] = pack(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup` built the structure)."""
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for attr in self.checkpoint_attributes:
            current = getattr(self, attr)
            if attr in self.optimizer_modules:
                if state[attr] is None:
                    log(
                        WARNING,
                        "the checkpoint holds no %s state (checkpoint-optimizer = "
                        "false): it restarts from zero moments",
                        attr,
                    )
                    continue
                module = getattr(self, self.optimizer_modules[attr])
                load_optimizer(current, module, state[attr])
                continue
            if current is None and holds_state_dict(state[attr]):
                current = self.build_module(attr)
            setattr(self, attr, unpack(state[attr], current))

    def build_module(self, attr: str) -> Any:
        """Create the module behind attribute ``attr`` that is built lazily (on
        the first replies), so a checkpoint can load into it."""
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild '{attr}'")

    def save_checkpoint(
        self, results: RunResults, server_round: int, waiting: dict[str, Any] | None
    ) -> None:
        """Write ``checkpoint.pt`` when ``checkpoint-every`` says so."""
        every, last = self.cfg.checkpoint_every, self.cfg.num_server_rounds
        due = server_round % every == 0 or server_round == last if every else False
        if not due or self.phase != "train":
            return
        start = time.perf_counter()
        write_checkpoint(
            results.path / CHECKPOINT_FILE,
            {
                "format": FORMAT,
                "strategy": self.name,
                "config": self.cfg.flat(),
                "round": server_round,
                "waiting": waiting,
                "metrics": list(results.records),
                "clients": [
                    {k: v for k, v in c.to_json().items() if k != "node_id"}
                    for c in self.clients
                ],
                "state": self.state_dict(),
            },
        )
        log(INFO, "round %d: checkpoint written in %.2f s", server_round,
            time.perf_counter() - start)  # fmt: skip

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the registry and the state of a checkpoint, then add newcomers.

        Clients of the checkpoint take the node ids of the live handshake; one
        that is not connected keeps its state and waits (node id 0) until it
        reconnects. A live client the checkpoint does not know joins fresh.
        """
        saved = ClientRegistry(
            ClientInfo(**(c | {"node_id": 0})) for c in checkpoint["clients"]
        )
        live = self.clients
        newcomers = [c for c in live if c.name not in saved]
        saved.merge(ClientRegistry(c for c in live if c.name in saved), set())
        self.clients = saved
        self.setup(saved)
        self.load_state_dict(checkpoint["state"])
        for info in newcomers:
            saved.add(info)
            self.register(info.name, info.num_params)
        absent = [c.name for c in saved if c.node_id == 0]
        if absent:
            log(WARNING, "resumed without clients %s; they rejoin when they "
                "reconnect", absent)  # fmt: skip

    # -- Flower's Strategy hooks -------------------------------------------------
    def messages_for(
        self,
        names: list[str],
        server_round: int,
        message_type: str,
        evaluate_first: bool = False,
    ) -> Iterator[Message]:
        """Build one message per client, lazily, so each is sent as soon as built.

        ``evaluate_first`` asks training clients to evaluate the received model
        before training it (see :meth:`carries_evaluation`).
        """
        for name in names:
            start = time.perf_counter()
            client = self.clients[name]
            if message_type == MessageType.TRAIN:
                content = self.train_payload(client, server_round)
            else:
                content = self.eval_payload(client, server_round)
            config = content.config_records.get(P.CONFIG, ConfigRecord())
            config[P.ROUND] = server_round
            if message_type == MessageType.TRAIN and evaluate_first:
                config[P.EVALUATE_FIRST] = True
            content[P.CONFIG] = config
            self.bytes_down += payload_bytes(content)
            self.server_seconds += time.perf_counter() - start
            yield Message(
                content,
                dst_node_id=client.node_id,
                message_type=message_type,
                group_id=str(server_round),
            )

    def sample_train_clients(self) -> list[str]:
        """A seeded sample of ``fraction-train`` of the clients (at least one)."""
        names = self.phase_names
        k = max(1, round(self.cfg.fraction_train * len(names)))
        if k >= len(names):
            return names
        return sorted(self.rng.choice(names, size=k, replace=False).tolist())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client, each with its own payload."""
        return self.messages_for(
            self.sample_train_clients(),
            server_round,
            MessageType.TRAIN,
            evaluate_first=self.evaluate_first,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client of the current phase."""
        return self.messages_for(self.phase_names, server_round, MessageType.EVALUATE)

    #: Metrics a reply must carry (finite, non-negative), by message kind.
    REQUIRED_METRICS: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": (P.NUM_EXAMPLES, P.LOSS, P.SECONDS),
        "evaluate": (P.NUM_EXAMPLES, P.CORRECT, P.LOSS),
    }

    def reject(self, name: str, kind: str, reason: str) -> None:
        """Log and count one rejected reply (``rejected_replies`` in the metrics)."""
        self.rejected += 1
        log(WARNING, "round %d: %s reply from %s rejected: %s", self.current_round,
            kind, name, reason)  # fmt: skip

    def metrics_problem(self, content: RecordDict, kind: str) -> str | None:
        """Why a reply's metrics are unusable, or ``None`` when they are fine."""
        record = P.METRICS if kind != "carried" else P.EVAL_METRICS
        try:
            metrics = content[record]
        except (KeyError, TypeError):
            return f"no '{record}' record"
        for key in self.REQUIRED_METRICS["evaluate" if kind == "carried" else kind]:
            value = metrics.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                return f"metric '{key}' is missing or not a number ({value!r})"
            if not np.isfinite(value) or value < 0:
                return f"metric '{key}' = {value} must be finite and >= 0"
        if kind != "train" and P.CORRECT_RECALIBRATED in metrics:
            value = metrics[P.CORRECT_RECALIBRATED]
            n = metrics[P.NUM_EXAMPLES]
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"metric '{P.CORRECT_RECALIBRATED}' is not a number"
            if not 0 <= value <= n:
                return f"metric '{P.CORRECT_RECALIBRATED}' = {value} not in [0, {n}]"
        return None

    def _valid_replies(
        self, server_round: int, replies: Iterable[Message], kind: str
    ) -> list[tuple[ClientInfo, RecordDict]]:
        """Keep well-formed replies from known clients (sorted by name).

        Rejected (logged with client, round and reason, and counted): error
        replies, replies from a node the registry does not know or whose claimed
        client name belongs to another node, and replies whose required metrics
        are missing, not finite or negative. A carried evaluation with bad
        metrics is dropped from an otherwise good train reply.
        """
        valid = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            name = self.clients.name_of(node_id)
            if reply.has_error():  # also the SuperLink's "node unavailable" replies
                self.reject(name or f"node {node_id}", kind, error_text(reply))
                continue
            if name is None:
                self.reject(f"unknown node {node_id}", kind, "not in the registry")
                continue
            content = reply.content
            try:
                claimed = str(content[P.INFO][P.CLIENT_NAME])
            except (KeyError, TypeError):
                claimed = None
            if claimed != name:
                self.reject(name, kind, f"it claims client name {claimed!r}, but "
                            f"node {node_id} belongs to '{name}'")  # fmt: skip
                continue
            problem = self.metrics_problem(content, kind)
            if problem:
                self.reject(name, kind, problem)
                continue
            if P.EVAL_METRICS in content and (
                carried := self.metrics_problem(content, "carried")
            ):
                self.reject(name, "carried evaluation", carried)
                del content[P.EVAL_METRICS]
            self.bytes_up += payload_bytes(content)
            self.count_client_seconds(kind, content)
            valid.append((self.clients[name], content))
        # Replies arrive in any order; results must not depend on it.
        return sorted(valid, key=lambda pair: pair[0].name)

    def start_costs(self) -> None:
        """Start a new window of the costs a record reports (:meth:`round_costs`):
        server compute, bytes, the sums of client-reported compute and this
        process's CPU time."""
        self.server_seconds = 0.0
        self.bytes_down = self.bytes_up = 0
        self.client_train_seconds_sum = 0.0
        self.client_eval_seconds_sum = 0.0
        self.client_cpu_seconds_sum = 0.0
        self.client_message_cpu_seconds_sum = 0.0
        self.client_messages = 0
        self.process_cpu_start = time.process_time()

    def count_client_seconds(self, kind: str, content: RecordDict) -> None:
        """Add one accepted reply's client-measured compute to the current sums.

        A train reply's ``seconds`` (local training, required) goes to the train
        sum; the ``seconds`` of an evaluation reply and of the evaluation a train
        reply carries (the evaluation loop; optional, absent from older clients)
        go to the evaluation sum; the ``cpu-seconds`` of all of them (optional)
        to the CPU sum, and the reply's ``message-cpu-seconds`` (optional: the
        client's CPU time for the whole message, carried evaluation included) to
        the message CPU sum. Replies count when they are processed, whatever round
        they answer, so the sums cover the same wall-clock window as the
        record's ``round_seconds`` (a carried evaluation of round ``r`` is
        counted in round ``r + 1``, whose messages it rode on).
        """
        self.client_messages += 1
        metrics = content.metric_records.get(P.METRICS)
        carried = content.metric_records.get(P.EVAL_METRICS)
        if kind == "train":
            self.client_train_seconds_sum += _seconds(metrics)
            self.client_eval_seconds_sum += _seconds(carried)
        else:
            self.client_eval_seconds_sum += _seconds(metrics)
        for record in (metrics, carried):
            self.client_cpu_seconds_sum += _seconds(record, P.CPU_SECONDS)
        self.client_message_cpu_seconds_sum += _seconds(metrics, P.MESSAGE_CPU_SECONDS)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the replies to the strategy's state; return mean train metrics."""
        valid = self._valid_replies(server_round, replies, "train")
        start = time.perf_counter()
        if len(valid) >= self.cfg.min_train_clients:
            self.apply_train_replies(server_round, valid)
        else:
            log(WARNING, "round %d: %d usable train replies, fewer than "
                "min-train-clients = %d; the update is skipped", server_round,
                len(valid), self.cfg.min_train_clients)  # fmt: skip
        self.server_seconds += time.perf_counter() - start
        return None, self.summarise_train(valid)

    def summarise_train(
        self, valid: list[tuple[ClientInfo, RecordDict]]
    ) -> MetricRecord:
        """Example-weighted train loss; keeps :attr:`last_train_metrics`.

        Replies to train messages that asked the client to evaluate first also
        carry that evaluation; it is kept in :attr:`carried_eval`.
        """
        weights = [int(c[P.METRICS][P.NUM_EXAMPLES]) for _, c in valid]
        losses = [float(c[P.METRICS][P.LOSS]) for _, c in valid]
        loss = float(np.average(losses, weights=weights)) if sum(weights) else np.nan
        self.last_train_metrics = {
            "train_loss": loss,
            "train_clients": len(valid),
            "client_train_seconds": max(
                (float(c[P.METRICS][P.SECONDS]) for _, c in valid), default=0.0
            ),
        }
        carried = [(c, r[P.EVAL_METRICS]) for c, r in valid if P.EVAL_METRICS in r]
        self.carried_eval = summarise_evaluation(carried)
        return MetricRecord({"train-loss": loss, "num-clients": len(valid)})

    def train_phase(self, grid: Grid, server_round: int) -> MetricRecord | None:
        """Send the round's train messages, collect and apply the replies.

        The default sends every sampled client its message at once (Flower's
        ``configure_train`` / ``aggregate_train``); a strategy that must order
        its updates (MH-pFedHN's windowed sequential update) overrides this.
        """
        replies = exchange(
            grid,
            self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid),
            self.cfg.round_timeout,
            self.cfg.max_in_flight,
        )
        return self.aggregate_train(server_round, replies)[1]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Total correct / total examples over clients, and per-client accuracy."""
        valid = self._valid_replies(server_round, replies, "evaluate")
        self.last_eval = summarise_evaluation([(c, r[P.METRICS]) for c, r in valid])
        if self.last_eval is None:
            return None
        return MetricRecord(
            {"accuracy": self.last_eval["accuracy"], "loss": self.last_eval["loss"]}
        )

    # -- the loop -------------------------------------------------------------------
    def carries_evaluation(self, server_round: int) -> bool:
        """Whether round ``server_round``'s evaluation rides on the next round.

        When every client trains in the next round, the model it receives there
        is exactly the model the evaluation would send (nothing changes the
        server state in between), so the client evaluates it before training
        and one message exchange per round is saved. The numbers are the same.
        """
        return (
            server_round < self.cfg.num_server_rounds and self.cfg.fraction_train >= 1.0
        )

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        results: RunResults,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        """Handshake, ``num-server-rounds`` rounds of train (+ evaluate), then
        whatever the strategy does after training (:meth:`after_training`).

        With a ``checkpoint`` (``resume-from``) the rounds continue after the
        checkpoint's round, from its exact state.
        """
        cfg = self.cfg
        nodes = wait_for_nodes(grid, cfg.min_clients, cfg.round_timeout)
        self.clients = handshake(grid, nodes, cfg.round_timeout)
        if not any(not c.novel for c in self.clients) and cfg.num_server_rounds:
            raise HandshakeError(
                "no client takes part in training: run-config train-clients = "
                f"{cfg.train_clients} and every client reported itself novel"
            )
        start = time.perf_counter()
        first, waiting = 1, None
        if checkpoint is None:
            self.setup(self.clients)
        else:
            self.restore(checkpoint)
            first, waiting = checkpoint["round"] + 1, checkpoint["waiting"]
            log(INFO, "Resuming after round %d", checkpoint["round"])
        self.server_seconds += time.perf_counter() - start
        self.write_clients(results)
        self.summary()
        self.phase = "train"
        self.run_rounds(grid, results, first, cfg.num_server_rounds, waiting)
        if waiting is not None and first > cfg.num_server_rounds:
            # Resumed at the very end: the last round's evaluation is still due.
            self.finish_round(results, waiting, self.evaluate_now(grid,
                              waiting["round"]))  # fmt: skip
        self.after_training(grid, results)

    def admit_new_nodes(self, grid: Grid, results: RunResults) -> None:
        """At a round's start: hand-shake nodes that connected since the last one.

        A new client name joins with fresh server state (:meth:`register`); a
        known name coming back from a new node (a restarted SuperNode) keeps its
        state. A node whose handshake fails is logged and not asked again.
        """
        live = set(grid.get_node_ids())
        known = {c.node_id for c in self.clients} | self._refused_nodes
        fresh = sorted(live - known)
        if not fresh:
            return
        try:
            joined = handshake(grid, fresh, self.cfg.round_timeout)
        except HandshakeError as err:
            log(WARNING, "nodes %s could not join: %s", fresh, err)
            self._refused_nodes.update(fresh)
            return
        new = self.clients.merge(joined, live - set(fresh))
        self._refused_nodes.update(n for n in fresh if self.clients.name_of(n) is None)
        start = time.perf_counter()
        for info in new:
            self.register(info.name, info.num_params)
            log(INFO, "client '%s' joined from node %s", info.name, info.node_id)
        self.server_seconds += time.perf_counter() - start
        self.write_clients(results)

    def write_clients(self, results: RunResults) -> None:
        """(Re)write ``clients.json`` from the registry and the strategy's details."""
        results.write_clients(
            [c.to_json() | self.client_details(c) for c in self.clients]
        )

    def register(self, name: str, num_params: int) -> None:
        """Create the server state of a client that joined after the handshake."""

    def after_training(self, grid: Grid, results: RunResults) -> None:
        """Hook after the training rounds (MH-pFedHN fits novel clients here)."""

    @property
    def phase_names(self) -> list[str]:
        """Connected clients of the current phase: training or novel clients.

        (Node id 0 marks a client restored from a checkpoint that has not
        reconnected yet.)
        """
        novel = self.phase == "novel"
        return [
            n
            for n in self.clients.names
            if self.clients[n].novel == novel and self.clients[n].node_id != 0
        ]

    def evaluate_now(self, grid: Grid, server_round: int) -> dict[str, Any] | None:
        """One evaluation exchange with the current phase's clients."""
        replies = exchange(
            grid,
            self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid),
            self.cfg.round_timeout,
            self.cfg.max_in_flight,
        )
        self.aggregate_evaluate(server_round, replies)
        return self.last_eval

    def run_rounds(
        self,
        grid: Grid,
        results: RunResults,
        first: int,
        last: int,
        waiting: dict[str, Any] | None = None,
    ) -> None:
        """Rounds ``first .. last`` of the current phase, evaluated as configured.

        ``waiting`` is the record of the round before ``first`` when its
        evaluation is still due (it rides on round ``first``'s messages).
        """
        cfg = self.cfg
        self.last_round = last
        for rnd in range(first, last + 1):
            t0 = time.perf_counter()
            self.current_round, self.rejected = rnd, 0
            self.start_costs()
            self.admit_new_nodes(grid, results)
            self.evaluate_first = waiting is not None
            self.train_phase(grid, rnd)
            if waiting is not None:
                self.finish_round(results, waiting, self.carried_eval)
                waiting = None
            record = {
                "round": rnd,
                **self.last_train_metrics,
                "rejected_replies": self.rejected,
                "train_seconds": time.perf_counter() - t0,
            }
            if rnd % cfg.eval_every and rnd != last:
                self.log_progress(record)
            elif self.carries_evaluation(rnd):
                waiting = self.round_costs(record, t0)
                self.log_progress(waiting, f"acc pending (with round {rnd + 1})")
            else:
                evaluation = self.evaluate_now(grid, rnd)
                record = self.round_costs(record, t0)
                self.finish_round(results, record, evaluation)
            self.save_checkpoint(results, rnd, waiting)

    def round_costs(self, record: dict[str, Any], t0: float) -> dict[str, Any]:
        """The record's costs since ``t0``: wall-clock, server and client compute,
        bytes and server memory.

        ``client_train_seconds_sum`` / ``client_eval_seconds_sum`` add up the
        seconds the clients report for their training and evaluation loops over
        the ``client_messages`` replies processed in that window, and
        ``client_cpu_seconds_sum`` their CPU time, ``client_message_cpu_seconds_sum``
        the clients' CPU time for handling the messages whole
        (:meth:`count_client_seconds`);
        ``server_process_cpu_seconds`` is the CPU time of this whole process in
        the window (server compute, and in simulation also the engine that runs
        in it); ``finished_at`` the Unix time of the record. The window starts
        with :meth:`start_costs`.
        """
        return record | {
            "round_seconds": time.perf_counter() - t0,
            "server_seconds": self.server_seconds,
            "client_train_seconds_sum": self.client_train_seconds_sum,
            "client_eval_seconds_sum": self.client_eval_seconds_sum,
            "client_cpu_seconds_sum": self.client_cpu_seconds_sum,
            "client_message_cpu_seconds_sum": self.client_message_cpu_seconds_sum,
            "client_messages": self.client_messages,
            "server_process_cpu_seconds": time.process_time() - self.process_cpu_start,
            "finished_at": time.time(),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            **server_memory_mb(),
        }

    def finish_round(
        self,
        results: RunResults,
        record: dict[str, Any],
        evaluation: dict[str, Any] | None,
    ) -> None:
        """Write an evaluated round's row and log its progress line.

        A record of a round before :attr:`current_round` is an evaluation that
        rode on a later round's messages (or is due after a resume): its training
        part was logged when the round ended, so only the accuracy is logged.
        """
        rnd = record["round"]
        carried = rnd != self.current_round
        if evaluation is None:
            log(WARNING, "round %d: no evaluation replies", rnd)
            if not carried:
                self.log_progress(record, "acc - (no evaluation replies)")
            return
        record = {"round": rnd, "phase": self.phase, **evaluation, **record}
        results.append(record)
        accuracy = (
            f"acc {100 * record['accuracy']:.2f}% (client mean "
            f"{100 * record['accuracy_mean']:.2f}%) | test loss {record['loss']:.4f}"
        )
        if carried:
            log(INFO, "%s | %s", self.round_label(rnd), accuracy)
        else:
            self.log_progress(record, accuracy)

    def round_label(self, server_round: int) -> str:
        """``round k/N`` (``novel round k/N`` for clients that join later)."""
        phase = "" if self.phase == "train" else f"{self.phase} "
        return f"{phase}round {server_round}/{self.last_round}"

    def log_progress(self, record: dict[str, Any], accuracy: str = "") -> None:
        """Log a round's line as soon as it ends: ``round k/N | acc | train loss
        | seconds | ETA | bytes`` (what the record has of it).

        The ETA is the mean of the phase's last 10 round durations times the
        rounds left. A round without evaluation has no ``acc`` part; one whose
        evaluation rides on the next round says so, and :meth:`finish_round`
        logs the accuracy when it arrives.
        """
        rnd = record["round"]
        seconds = record.get("round_seconds", record.get("train_seconds", 0.0))
        times = self.round_times.setdefault(self.phase, [])
        times.append(seconds)
        eta = np.mean(times[-10:]) * max(0, self.last_round - rnd)
        parts = [self.round_label(rnd)] + ([accuracy] if accuracy else [])
        if "train_loss" in record:
            parts.append(f"train loss {record['train_loss']:.4f}")
        parts += [f"{seconds:.2f} s", f"ETA {format_duration(eta)}"]
        if "bytes_down" in record:
            parts.append(f"down {format_bytes(record['bytes_down'])}, "
                         f"up {format_bytes(record['bytes_up'])}")  # fmt: skip
        log(INFO, "%s", " | ".join(parts))


def _seconds(metrics: MetricRecord | None, key: str = P.SECONDS) -> float:
    """A record's ``key`` metric when it is a finite number >= 0, else 0."""
    value = None if metrics is None else metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0.0
    return float(value) if np.isfinite(value) and value >= 0 else 0.0


def summarise_evaluation(
    replies: list[tuple[ClientInfo, MetricRecord]],
) -> dict[str, Any] | None:
    """Accuracy as total correct / total examples, plus the per-client view; with
    ``bn-eval = "both"`` also ``accuracy_recalibrated``."""
    if not replies:
        return None
    per_client, correct, total, loss_sum = {}, 0, 0, 0.0
    recalibrated, any_recalibrated = 0, False
    for client, m in replies:
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
