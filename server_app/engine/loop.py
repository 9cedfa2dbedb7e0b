"""The engine: runs one algorithm through a federated run.

The round loop reads like Flower's ``Strategy.start``: configure (sample the
clients, build one message each from the algorithm's payload), send and receive
(:mod:`.exchange`), aggregate (validate the replies once, :mod:`.replies`, and
hand the accepted ones to the algorithm), evaluate (every client on its local
test split every ``eval-every`` rounds and after the last one; carried on the
next round's messages when possible, :mod:`.carry`). Around it: the handshake
and later joins (:mod:`.registry`), costs (:mod:`.costs`), checkpoints and the
results directory.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P

from ..results import RunResults
from . import checkpointing
from .carry import CarriedEvaluation
from .costs import Costs
from .exchange import InOrder, exchange, side_by_side
from .progress import Progress
from .registry import (
    ClientRegistry,
    HandshakeError,
    handshake,
    wait_for_nodes,
)
from .replies import Reply, ReplyCheck, summarise_evaluation, summarise_train

if TYPE_CHECKING:
    from common.config import RunConfig

    from ..strategies.base import Algorithm

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE


class Engine:
    """Runs ``algorithm``: handshake, rounds, evaluation, checkpoints, results.

    Not a Flower ``Strategy`` subclass: its state is the algorithm's, not one
    ``ArrayRecord``, and :meth:`start` takes the results directory and a checkpoint.
    """

    def __init__(self, algorithm: Algorithm, cfg: RunConfig) -> None:
        self.algorithm = algorithm
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.clients = ClientRegistry()
        self.costs = Costs()
        self.carry = CarriedEvaluation(cfg)
        self.progress = Progress(cfg.num_server_rounds)
        self.check = ReplyCheck(
            cfg, self.costs, algorithm.expects, algorithm.read_reply
        )
        self.refused_nodes: set[int] = set()
        #: Sent in every message's config (:data:`common.protocol.RUN_KEY`).
        self.lineage = checkpointing.lineage(None)

    # -- the run -----------------------------------------------------------------
    def start(
        self, grid: Grid, results: RunResults, checkpoint: dict[str, Any] | None = None
    ) -> None:
        """Handshake, ``num-server-rounds`` rounds of train (+ evaluate), then the
        novel clients' phase if the algorithm has one.

        With a ``checkpoint`` (``resume-from``) the rounds continue after the
        checkpoint's round, from its exact state.
        """
        cfg = self.cfg
        if checkpoint is not None:
            self.lineage = checkpointing.lineage(checkpoint)
        nodes = wait_for_nodes(grid, cfg.min_clients, cfg.round_timeout)
        self.clients = handshake(grid, nodes, cfg.round_timeout, self.lineage)
        if not any(not c.novel for c in self.clients) and cfg.num_server_rounds:
            raise HandshakeError(
                "no client takes part in training: run-config train-clients = "
                f"{cfg.train_clients} and every client reported itself novel"
            )
        first = 1
        with self.costs.server_time():
            if checkpoint is None:
                self.algorithm.start(self.clients)
            else:
                checkpointing.restore(self, checkpoint)
                first, self.carry.waiting = (
                    checkpoint["round"] + 1,
                    checkpoint["waiting"],
                )
                log(INFO, "Resuming after round %d", checkpoint["round"])
        self.write_clients(results)
        self.algorithm.summary()
        self.run_rounds(grid, results, first, cfg.num_server_rounds)
        if (waiting := self.carry.take()) is not None:
            # Resumed at the very end: the last round's evaluation is still due.
            evaluation = self.evaluate(grid, waiting["round"])
            self.progress.finish_round(results, waiting, evaluation)
        self.algorithm.after_training(results.path)
        if self.algorithm.begin_novel_phase():
            self.novel_phase(grid, results)

    def novel_phase(self, grid: Grid, results: RunResults) -> None:
        """Fit the clients that join after training for ``novel-rounds`` rounds.

        Their accuracy before fitting is recorded at the last training round with
        ``phase = "novel"``, then after each fitting round.
        """
        last = self.cfg.num_server_rounds
        self.progress.phase, self.progress.last_round = "novel", last
        start = time.perf_counter()
        self.costs.start()
        evaluation = self.evaluate(grid, last)
        self.progress.finish_round(
            results, self.costs.record({"round": last}, start), evaluation
        )
        self.run_rounds(grid, results, last + 1, last + self.cfg.novel_rounds)

    def run_rounds(
        self, grid: Grid, results: RunResults, first: int, last: int
    ) -> None:
        """Rounds ``first .. last`` of the current phase, evaluated as configured.

        A record waiting in :attr:`carry` is the round before ``first``, whose
        evaluation rides on round ``first``'s messages.
        """
        self.progress.last_round = last
        for rnd in range(first, last + 1):
            t0 = time.perf_counter()
            self.progress.current_round = self.check.server_round = rnd
            self.check.rejected = 0
            self.costs.start()
            self.admit_new_nodes(grid, results)
            waiting = self.carry.take()
            train, carried = self.train_round(grid, rnd, waiting is not None)
            if waiting is not None:
                self.progress.finish_round(results, waiting, carried)
            record = {
                "round": rnd,
                **train,
                "rejected_replies": self.check.rejected,
                "train_seconds": time.perf_counter() - t0,
            }
            ordered = self.algorithm.sequential
            if rnd % self.cfg.eval_every and rnd != last:
                self.progress.log(record)
            elif self.carry.carries(rnd, ordered, len(self.phase_names)):
                self.carry.waiting = self.costs.record(record, t0)
                self.progress.log(self.carry.waiting,
                                  f"acc pending (with round {rnd + 1})")  # fmt: skip
            else:
                evaluation = self.evaluate(grid, rnd)
                record = self.costs.record(record, t0)
                self.progress.finish_round(results, record, evaluation)
            checkpointing.save_if_due(self, results, rnd)

    # -- configure ---------------------------------------------------------------
    @property
    def phase_names(self) -> list[str]:
        """Connected clients of the current phase: training or novel clients.

        (Node id 0 marks a client restored from a checkpoint that has not
        reconnected yet.)
        """
        novel = self.progress.phase == "novel"
        return [
            n
            for n in self.clients.names
            if self.clients[n].novel == novel and self.clients[n].node_id != 0
        ]

    def sample_train_clients(self) -> list[str]:
        """A seeded sample of ``fraction-train`` of the clients (at least one)."""
        names = self.phase_names
        k = max(1, round(self.cfg.fraction_train * len(names)))
        if k >= len(names):
            return names
        return sorted(self.rng.choice(names, size=k, replace=False).tolist())

    def messages(
        self,
        names: list[str],
        server_round: int,
        message_type: str,
        evaluate_first: Collection[str] = (),
    ) -> Iterator[Message]:
        """One message per client, built lazily so each is sent as soon as built.

        ``evaluate_first``: the training clients asked to evaluate the received
        model before training it (a carried evaluation).
        """
        for name in names:
            client = self.clients[name]
            with self.costs.server_time():
                if message_type == TRAIN:
                    content = self.algorithm.train_payload(client, server_round)
                else:
                    content = self.algorithm.eval_payload(client, server_round)
                config = content.config_records.get(P.CONFIG, ConfigRecord())
                config[P.ROUND] = server_round
                config.update(self.lineage)
                if message_type == TRAIN and name in evaluate_first:
                    config[P.EVALUATE_FIRST] = True
                content[P.CONFIG] = config
                self.costs.sent(content)
            yield Message(
                content,
                dst_node_id=client.node_id,
                message_type=message_type,
                group_id=str(server_round),
            )

    # -- send, receive, aggregate --------------------------------------------------
    def train_round(
        self, grid: Grid, server_round: int, evaluate_first: bool
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """Train the sampled clients and apply their replies; return the train
        summary and the carried evaluation of the previous round (if due)."""
        names = self.sample_train_clients()
        if self.algorithm.sequential:
            return self.ordered_round(grid, server_round, names, evaluate_first)
        carried_by = names if evaluate_first else ()
        messages = self.messages(names, server_round, TRAIN, carried_by)
        replies = exchange(
            grid, messages, self.cfg.round_timeout, self.cfg.max_in_flight
        )
        valid = self.aggregate_train(server_round, replies)
        return summarise_train(valid), self.summarise_evaluate([], carried_by=valid)

    def aggregate_train(self, server_round: int, replies: list[Message]) -> list[Reply]:
        """Validate the round's train replies and let the algorithm apply the
        accepted ones (when at least ``min-train-clients``); return those."""
        valid = self.check.messages(self.clients, replies, "train")
        with self.costs.server_time():
            if len(valid) >= self.cfg.min_train_clients:
                self.algorithm.apply_train_replies(server_round, valid)
            else:
                log(WARNING, "round %d: %d usable train replies, fewer than "
                    "min-train-clients = %d; the update is skipped", server_round,
                    len(valid), self.cfg.min_train_clients)  # fmt: skip
        return valid

    def ordered_round(
        self, grid: Grid, server_round: int, names: list[str], evaluate_first: bool
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """A round of sequential updates with at most ``W`` clients in flight.

        Clients are visited in a seeded random order ``c_1 .. c_m`` (with
        ``hn-order = "by-size"``, regrouped by :func:`~.exchange.side_by_side`
        so that clients in flight together have equal size). Client
        ``c_k`` is sent its payload built after the replies of ``c_1 ..
        c_{k-W}`` have been applied, and replies are applied strictly in that
        order (:class:`~.exchange.InOrder`), so the outcome does not depend on
        timing. A client that fails or does not answer within ``round-timeout``
        seconds is skipped.

        A carried evaluation (the previous round's, of the state the round
        starts from) rides on the first ``W`` train messages, which are built
        from that state; the other clients get evaluation messages right after
        them, and each of those clients' train message waits for its
        evaluation's reply, so every client evaluates before it trains again
        (BatchNorm statistics are those the evaluated model was trained with).

        ``min-train-clients``: the round changes nothing unless at least that
        many replies were accepted (the algorithm undoes what it applied).
        """
        order = [names[k] for k in self.rng.permutation(len(names))]
        width = self.algorithm.window(len(order)) or len(order)
        if self.cfg.hn_order == "by-size":
            sizes = {name: self.clients[name].num_params for name in order}
            order = side_by_side(order, sizes, width, self.rng)
        carried_by, alongside = [], ()
        if evaluate_first:
            carried_by = order[:width]
            # In visiting order: the evaluations the next train messages wait for
            # come first.
            rest = order[width:] + [n for n in self.phase_names if n not in order]
            alongside = self.messages(rest, server_round - 1, EVALUATE)
        with self.costs.server_time():
            self.algorithm.begin_ordered_round(server_round)
        flight = InOrder(
            grid,
            self.messages(order, server_round, TRAIN, carried_by),
            self.cfg.round_timeout,
            width,
            alongside,
        )
        applied: list[Reply] = []
        for position, message in flight:
            if message is None:
                log(
                    WARNING, "round %d: no reply from %s", server_round, order[position]
                )
                continue
            for reply in self.check.messages(self.clients, [message], "train"):
                with self.costs.server_time():
                    self.algorithm.apply_train_reply(server_round, reply)
                applied.append(reply)
        applied.sort(key=lambda r: r.client.name)
        complete = len(applied) >= self.cfg.min_train_clients
        if not complete:
            log(WARNING, "round %d: %d usable train replies, fewer than "
                "min-train-clients = %d; the round's updates are undone",
                server_round, len(applied), self.cfg.min_train_clients)  # fmt: skip
        with self.costs.server_time():
            self.algorithm.end_ordered_round(server_round, applied, complete)
        carried = None
        if evaluate_first:
            carried = self.summarise_evaluate(
                flight.alongside_replies, carried_by=applied
            )
        return summarise_train(applied), carried

    # -- evaluate ----------------------------------------------------------------
    def evaluate(self, grid: Grid, server_round: int) -> dict[str, Any] | None:
        """One evaluation exchange with the current phase's clients."""
        messages = self.messages(self.phase_names, server_round, EVALUATE)
        replies = exchange(
            grid, messages, self.cfg.round_timeout, self.cfg.max_in_flight
        )
        return self.summarise_evaluate(replies)

    def summarise_evaluate(
        self, replies: list[Message], carried_by: Collection[Reply] = ()
    ) -> dict[str, Any] | None:
        """Total correct / total examples over the accepted evaluation replies
        and the evaluations that the train replies ``carried_by`` carried."""
        valid = self.check.messages(self.clients, replies, "evaluate")
        return summarise_evaluation(
            [(r.client, r.carried) for r in carried_by if r.carried]
            + [(r.client, r.metrics) for r in valid]
        )

    # -- clients -----------------------------------------------------------------
    def admit_new_nodes(self, grid: Grid, results: RunResults) -> None:
        """At a round's start: hand-shake nodes that connected since the last one.

        A new client name joins with fresh server state (``register``); a known
        name coming back from a new node (a restarted SuperNode) keeps its
        state. A node whose handshake fails is logged and not asked again.
        """
        live = set(grid.get_node_ids())
        known = {c.node_id for c in self.clients} | self.refused_nodes
        fresh = sorted(live - known)
        if not fresh:
            return
        try:
            joined = handshake(grid, fresh, self.cfg.round_timeout, self.lineage)
        except HandshakeError as err:
            log(WARNING, "nodes %s could not join: %s", fresh, err)
            self.refused_nodes.update(fresh)
            return
        new = self.clients.merge(joined, live - set(fresh))
        self.refused_nodes.update(n for n in fresh if self.clients.name_of(n) is None)
        with self.costs.server_time():
            for info in new:
                self.algorithm.register(info.name, info.num_params)
                log(INFO, "client '%s' joined from node %s", info.name, info.node_id)
        self.write_clients(results)

    def write_clients(self, results: RunResults) -> None:
        """(Re)write ``clients.json`` from the registry and the algorithm's details."""
        details = self.algorithm.client_details
        results.write_clients([c.to_json() | details(c) for c in self.clients])
