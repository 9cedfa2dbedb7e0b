"""MH-pFedHN: a server-side hypernetwork generates every client's own model.

Paper: Zhang et al., "Hypernetworks for Model-Heterogeneous Personalized Federated
Learning" (arXiv 2507.22330); see ``shared/PAPER.md``.

Per round, for every sampled client ``i``: the server sends
``theta_i = h(v_i; phi)``; the client trains it and answers
``delta_i = theta_i - theta_i_trained``. The hypernetwork gradient of one reply is
the vector-Jacobian product

    g_i = (d theta_i / d phi)^T delta_i = grad_phi <h(v_i; phi), delta_i>,

computed by one backward pass with ``delta_i`` as the output gradient. The
gradient is clipped to norm ``hn-grad-clip`` (50) and Adam (``hn-lr`` 2e-4) takes
a step over extractor, heads and embeddings together. Parameters that a step does
not touch (other clients' embeddings, heads of other chunk counts) have no
gradient and are skipped by Adam, exactly as in the reference code.

``hn-update`` chooses how replies become steps:

``sequential`` (default)
    One Adam step per reply, in a seeded random order of the round's clients, with
    at most ``hn-window`` clients training at once (:meth:`MHPFedHN.train_phase`):
    client ``k`` trains a ``theta`` that already includes the updates of clients
    ``1 .. k - W``. ``W = 1`` is the reference implementation, which visits the
    clients one after another; the VJP of each reply is taken at the current
    hypernetwork state.
``mean``
    Everyone trains from the round-start state; one Adam step on
    ``sum_i w_i g_i`` with ``w_i = n_i / sum_j n_j`` (``n_i`` the client's
    training examples).

Wire: ``theta`` down (``K_i`` values), ``delta`` up (same size), float32 by
default; run-config ``transfer`` sends both as float16 (``fp16``) or the delta as
its ``ceil(topk-fraction * K_i)`` largest-magnitude entries (``topk``), see
:mod:`common.transfer`. The server keeps everything in float32. It never learns
the clients' architectures, only ``K_i``.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.transfer import encode_dense

from ..exchange import POLL_SECONDS
from ..hypernet import HyperNetwork, reference_init_
from ..registry import ClientInfo, ClientRegistry, natural_key
from ..results import RunResults
from . import register_strategy
from .base import HeteroStrategy

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
#: The trained hypernetwork in a run's results directory (``hypernet-from``).
HYPERNET_FILE = "hypernet.pt"


@register_strategy("mh-pfedhn")
class MHPFedHN(HeteroStrategy):
    """The hypernetwork strategy; see the module docstring for the math."""

    checkpoint_attributes = ("hn", "optimizer", "torch_gen")
    optimizer_modules = {"optimizer": "hn"}

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.device = cfg.torch_device()
        # Heads and embeddings draw from their own stream, derived from the seed:
        # seeding it with ``seed`` itself, like the global stream the extractor is
        # initialised from, made the first head's weights a scaled copy of the
        # extractor's (correlation 1.0 over their first 41,216 entries).
        heads_seed = np.random.SeedSequence([cfg.seed, 0x4EAD]).generate_state(1)[0]
        self.torch_gen = torch.Generator().manual_seed(int(heads_seed))
        torch.manual_seed(cfg.seed)
        self.hn = self.build_hypernetwork()
        self.optimizer: torch.optim.Optimizer | None = None
        # theta_i of the current hypernetwork state: evaluation after round r and
        # training in round r+1 send the same vectors; any update clears it.
        self._theta_cache: dict[str, np.ndarray] = {}
        self.loaded_heads: set[str] = set()
        # Sequential rounds with min-train-clients > 1: every parameter the round
        # stepped, with its value and optimizer state before the first step.
        self._undo: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] | None = None

    # -- state ------------------------------------------------------------------------
    def build_hypernetwork(self) -> HyperNetwork:
        """The hypernetwork (before any client is registered)."""
        return HyperNetwork.from_config(self.cfg).to(self.device)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The hypernetwork optimizer: Adam with ``hn-lr`` (PAPER.md)."""
        return torch.optim.Adam(params, lr=self.cfg.hn_lr, fused=True)

    def register(self, name: str, num_params: int) -> None:
        """Add a client (and a head for a new chunk count) to the hypernetwork."""
        created = self.hn.add_client(name, num_params, generator=self.torch_gen)
        if self.optimizer is None:
            self.optimizer = self.make_optimizer(self.hn.parameters())
        elif created:
            self.optimizer.add_param_group({"params": created})

    def setup(self, clients: ClientRegistry) -> None:
        for name in clients.names:
            self.register(name, clients[name].num_params)
        if self.cfg.hn_init == "reference":
            order = sorted(clients.names, key=natural_key)
            reference_init_(self.hn, order, self.cfg.seed)
            log(INFO, "Hypernetwork initialised in the reference order (%s first)",
                order[0])  # fmt: skip
        if self.cfg.hypernet_from:
            path = Path(self.cfg.hypernet_from).expanduser()
            if path.is_dir():
                path = path / HYPERNET_FILE
            novel = {c.name for c in clients if c.novel}
            self.loaded_heads = self.hn.load_trained(path, skip=novel)
            log(INFO, "Loaded hypernetwork from %s (heads %s)", path,
                ", ".join(sorted(self.loaded_heads, key=int)))  # fmt: skip
        log(
            INFO,
            "Hypernetwork: %d clients, %d heads (chunk counts %s), %.1f M parameters",
            len(clients),
            len(self.hn.heads),
            ", ".join(sorted(self.hn.heads, key=int)),
            sum(p.numel() for p in self.hn.parameters()) / 1e6,
        )

    def client_details(self, client: ClientInfo) -> dict[str, Any]:
        return {
            "chunks": self.hn.chunks_of(client.name),
            "head": self.hn.head_of(client.name),
        }

    # -- messages ---------------------------------------------------------------------
    def theta(self, name: str, keep: bool = True) -> np.ndarray:
        """``theta`` of ``name`` under the current hypernetwork (float32, CPU).

        ``keep``: cache it until the next update (evaluation does not, see
        :meth:`eval_payload`).
        """
        vector = self._theta_cache.get(name)
        if vector is None:
            vector = self.hn.generate(name).numpy()
            if keep:
                self._theta_cache[name] = vector
        return vector

    def wire(self, vector: np.ndarray) -> Array:
        """A generated vector as it goes down under run-config ``transfer``."""
        return Array(encode_dense(vector, self.cfg.transfer))

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        theta = self.wire(self.theta(client.name))
        return RecordDict({P.ARRAYS: ArrayRecord({P.THETA: theta})})

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """``theta`` only; a vector generated for evaluation is not cached.

        Every registered client is evaluated, so caching those vectors would keep
        ``K`` floats per client in memory until the next update (936 MB for 1000
        CNN clients); training messages, for the sampled clients only, are cached.
        """
        theta = self.wire(self.theta(client.name, keep=False))
        return RecordDict({P.ARRAYS: ArrayRecord({P.THETA: theta})})

    # -- update -----------------------------------------------------------------------
    def hn_step(self, items: list[tuple[str, torch.Tensor, float]]) -> float:
        """One Adam step on ``sum_k w_k (d theta_k/d phi)^T delta_k``.

        ``items`` holds ``(client name, delta, weight)``. Returns the gradient norm
        before clipping.
        """
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        for name, delta, weight in items:
            self.hn.accumulate_vjp(name, delta.to(self.device) * weight)
        params = [p for p in self.hn.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.hn_grad_clip)
        if self._undo is not None:
            self.remember(params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._theta_cache.clear()
        return float(norm)

    def remember(self, params: list[torch.Tensor]) -> None:
        """Keep the value and optimizer state of each of ``params`` that the round
        has not stepped yet (for :meth:`undo_round`)."""
        assert self.optimizer is not None and self._undo is not None
        for p in params:
            if id(p) not in self._undo:
                state = self.optimizer.state.get(p)
                saved = None
                if state:
                    saved = {
                        k: v.clone() if torch.is_tensor(v) else v
                        for k, v in state.items()
                    }
                self._undo[id(p)] = (p, p.detach().clone(), saved)

    @torch.no_grad()
    def undo_round(self) -> None:
        """Put every parameter the round stepped, and its optimizer state, back as
        it was before the round's first step (bit for bit)."""
        assert self.optimizer is not None and self._undo is not None
        for p, value, state in self._undo.values():
            p.copy_(value)
            if state is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p] = state
        self._undo.clear()
        self._theta_cache.clear()

    def reply_delta(
        self, client: ClientInfo, content: RecordDict, key: str = P.DELTA, of: str = ""
    ) -> torch.Tensor | None:
        """A reply's delta as a float32 tensor, or ``None`` (logged) if unusable.

        ``key`` is its base key (decoded under run-config ``transfer``, see
        :meth:`reply_update`); ``of`` the hypernetwork entry it must fit
        (default: the client's own).
        """
        length = self.hn.num_params[of or client.name]
        delta = self.reply_update(client, content, key, length)
        return None if delta is None else torch.from_numpy(delta)

    def absorb(self, client: ClientInfo, content: RecordDict) -> None:
        """Sequential rounds: apply one reply (one Adam step on its VJP)."""
        delta = self.reply_delta(client, content)
        if delta is not None:
            self.hn_step([(client.name, delta, 1.0)])

    def end_train_phase(self, replies: list[tuple[ClientInfo, RecordDict]]) -> None:
        """Sequential rounds: called once every reply of the round was absorbed."""

    def apply_train_replies(
        self, server_round: int, replies: list[tuple[ClientInfo, RecordDict]]
    ) -> None:
        """``mean``: one step on the example-weighted mean of the replies' VJPs.

        (``sequential`` rounds apply each reply as it comes, in
        :meth:`train_phase`.)
        """
        usable = []
        for client, content in replies:
            delta = self.reply_delta(client, content)
            if delta is not None:
                usable.append((client.name, delta, self.num_examples(content)))
        total = sum(n for _, _, n in usable)
        if total > 0:
            self.hn_step([(name, delta, n / total) for name, delta, n in usable])

    # -- clients that join after training ----------------------------------------
    def after_training(self, grid: Grid, results: RunResults) -> None:
        """Save the hypernetwork, then fit the novel clients' embeddings.

        Extractor and the heads that training produced (or ``hypernet-from``
        loaded) are frozen. Only the novel clients' fresh embeddings, and a new
        head for a chunk count no trained head has, are fitted: Adam with
        ``novel-lr`` for ``novel-rounds`` rounds, applied like training rounds.
        Their accuracy before fitting is recorded at the last training round with
        ``phase = "novel"``, then after each fitting round.
        """
        self.hn.save(results.path / HYPERNET_FILE)
        novel = {c.name for c in self.clients if c.novel}
        if not novel:
            return
        trained = self.loaded_heads | {
            self.hn.head_of(n) for n in self.hn.num_params if n not in novel
        }
        self.hn.extractor.requires_grad_(False)
        fitted = [self.hn.embeddings[n] for n in sorted(novel)]
        for key, head in self.hn.heads.items():
            head.requires_grad_(key not in trained)
            if key not in trained:
                fitted += list(head.parameters())
        self.optimizer = torch.optim.Adam(fitted, lr=self.cfg.novel_lr, fused=True)
        self._theta_cache.clear()
        new_heads = sorted(set(self.hn.heads) - trained, key=int)
        log(INFO, "Novel clients: %d, new heads: %s", len(novel), new_heads or "none")
        self.phase = "novel"
        last = self.cfg.num_server_rounds
        self.last_round = last
        start = time.perf_counter()
        self.start_costs()
        evaluation = self.evaluate_now(grid, last)
        self.last_train_metrics = {}
        self.finish_round(results, self.round_costs({"round": last}, start), evaluation)
        self.run_rounds(grid, results, last + 1, last + self.cfg.novel_rounds)

    # -- the windowed sequential round ---------------------------------------------
    def carries_evaluation(self, server_round: int) -> bool:
        """As the base class, and in a sequential round only when every
        evaluation message fits in ``max-in-flight``: they are generated from the
        round-start state, so they all go out with the first train messages.
        Otherwise the evaluation is its own windowed exchange.
        """
        window = self.cfg.max_in_flight
        fits = window == 0 or len(self.phase_names) <= window
        return super().carries_evaluation(server_round) and (
            fits or self.cfg.hn_update != "sequential"
        )

    def window(self, num_train: int) -> int:
        """Clients in flight at once in a sequential round (``hn-window``)."""
        w = self.cfg.hn_window
        return num_train if w == 0 else min(w, num_train)

    def train_phase(self, grid: Grid, server_round: int) -> MetricRecord | None:
        """A round of the sequential update with at most ``W`` clients in flight.

        Clients are visited in a seeded random order ``c_1 .. c_m``. Client
        ``c_k`` is sent ``theta`` generated after the updates of
        ``c_1 .. c_{k-W}`` have been applied, and updates are applied strictly in
        that order (a reply that arrives early waits for its predecessors). So the
        outcome does not depend on timing: ``W = 1`` is exactly the reference
        algorithm (fresh ``theta`` for every client), ``W = m`` trains everyone from
        the round-start state. A client that fails or does not answer within
        ``round-timeout`` seconds is skipped.

        When the previous round's evaluation is due (:meth:`carries_evaluation`),
        its messages go out right after the first ``W`` train messages, which are
        generated from the same state, so the workers never wait between rounds.

        ``min-train-clients``: as in a ``mean`` round, the round changes nothing
        unless at least that many replies were usable. Steps are taken as replies
        arrive, so with a limit above 1 each stepped parameter's value and
        optimizer state are kept before its first step of the round and put back
        when the round ends short (:meth:`undo_round`; memory: one copy of what
        the round stepped), and the end-of-round update (:meth:`end_train_phase`)
        is skipped. Honoured, not refused: the guard means the same in both modes.
        """
        if self.cfg.hn_update != "sequential":
            return super().train_phase(grid, server_round)
        self._undo = {} if self.cfg.min_train_clients > 1 else None
        names = self.sample_train_clients()
        order = [names[k] for k in self.rng.permutation(len(names))]
        width = self.window(len(order))
        sent: dict[str, tuple[int, float]] = {}  # message id -> (position, time)
        arrived: dict[int, Message | None] = {}
        applied: list[tuple[ClientInfo, RecordDict]] = []

        def send(position: int) -> None:
            # A list: Flower's deployment grid iterates its argument twice.
            messages = list(self.messages_for([order[position]], server_round, TRAIN))
            ids = list(grid.push_messages(messages))
            if not ids:  # the node is gone: nothing will come back
                arrived[position] = None
            for message_id in ids:
                sent[message_id] = (position, time.monotonic())

        for position in range(width):
            send(position)
        evaluations = ()
        if self.evaluate_first:
            evaluations = grid.push_messages(
                list(self.messages_for(self.phase_names, server_round - 1, EVALUATE))
            )
        pending_eval, eval_replies = set(evaluations), []

        def pull() -> None:
            for reply in grid.pull_messages([*sent, *pending_eval]):
                message_id = reply.metadata.reply_to_message_id
                if message_id in pending_eval:
                    pending_eval.discard(message_id)
                    eval_replies.append(reply)
                else:
                    arrived[sent.pop(message_id)[0]] = reply

        following = width
        for position in range(len(order)):
            while position not in arrived:
                pull()
                if position in arrived:
                    break
                (message_id, (_, sent_at)), *_ = (
                    (m, v) for m, v in sent.items() if v[0] == position
                )
                if time.monotonic() - sent_at > self.cfg.round_timeout:
                    sent.pop(message_id)
                    arrived[position] = None
                    log(
                        WARNING,
                        "round %d: no reply from %s",
                        server_round,
                        order[position],
                    )
                else:
                    time.sleep(POLL_SECONDS)
            reply = arrived.pop(position)
            valid = self._valid_replies(server_round, [reply] if reply else [], "train")
            start = time.perf_counter()
            for client, content in valid:
                self.absorb(client, content)
                applied.append((client, content))
            self.server_seconds += time.perf_counter() - start
            if following < len(order):
                send(following)
                following += 1
        deadline = time.monotonic() + self.cfg.round_timeout
        while pending_eval and time.monotonic() < deadline:
            pull()
            time.sleep(POLL_SECONDS if pending_eval else 0)
        applied.sort(key=lambda pair: pair[0].name)
        start = time.perf_counter()
        if len(applied) >= self.cfg.min_train_clients:
            self.end_train_phase(applied)
        else:
            if self._undo is not None:
                self.undo_round()
            log(WARNING, "round %d: %d usable train replies, fewer than "
                "min-train-clients = %d; the round's updates are undone",
                server_round, len(applied), self.cfg.min_train_clients)  # fmt: skip
        self._undo = None
        self.server_seconds += time.perf_counter() - start
        metrics = self.summarise_train(applied)
        if self.evaluate_first:
            self.aggregate_evaluate(server_round - 1, eval_replies)
            self.carried_eval = self.last_eval
        return metrics
