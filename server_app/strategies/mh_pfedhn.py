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
    at most ``hn-window`` clients training at once (the engine's ordered round):
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

from dataclasses import dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log

from common import protocol as P
from common.config import RunConfig
from common.transfer import encode_dense

from ..engine.registry import ClientInfo, ClientRegistry, natural_key
from ..engine.replies import Expect, Reply, Update
from ..hypernet import HyperNetwork, reference_init_
from . import register_strategy
from .base import Algorithm, Params

#: The trained hypernetwork in a run's results directory (``hypernet-from``).
HYPERNET_FILE = "hypernet.pt"


@dataclass(frozen=True)
class MHPFedHNParams(Params):
    """The hypernetwork's shape (:class:`HyperNetwork`), its optimizer and update
    order, where it lives, and what the wire carries."""

    device: torch.device
    embed_dim: int
    hidden_dim: int
    hidden_layers: int
    chunk_size: int
    embed_init_std: float
    head_type: str
    head_rank: int
    hn_init: str
    hn_lr: float
    hn_grad_clip: float
    hn_update: str
    hn_window: int
    min_train_clients: int
    hypernet_from: str
    novel_lr: float
    transfer: str

    @classmethod
    def from_config(cls, cfg: RunConfig) -> MHPFedHNParams:
        """As :meth:`Params.from_config`, with ``device = "auto"`` resolved."""
        return replace(super().from_config(cfg), device=cfg.torch_device())


@register_strategy("mh-pfedhn")
class MHPFedHN(Algorithm):
    """The hypernetwork strategy; see the module docstring for the math."""

    checkpoint_attributes = ("hn", "optimizer", "torch_gen")
    optimizer_modules = {"optimizer": "hn"}

    Params = MHPFedHNParams

    def __init__(self, params: MHPFedHNParams) -> None:
        super().__init__(params)
        self.device = params.device
        # Heads and embeddings draw from their own stream, derived from the seed:
        # seeding it with ``seed`` itself, like the global stream the extractor is
        # initialised from, made the first head's weights a scaled copy of the
        # extractor's (correlation 1.0 over their first 41,216 entries).
        heads_seed = np.random.SeedSequence([params.seed, 0x4EAD]).generate_state(1)[0]
        self.torch_gen = torch.Generator().manual_seed(int(heads_seed))
        torch.manual_seed(params.seed)
        self.hn = self.build_hypernetwork()
        self.optimizer: torch.optim.Optimizer | None = None
        # theta_i of the current hypernetwork state: evaluation after round r and
        # training in round r+1 send the same vectors; any update clears it.
        self._theta_cache: dict[str, np.ndarray] = {}
        self.loaded_heads: set[str] = set()
        # Sequential rounds with min-train-clients > 1: every parameter the round
        # stepped, with its value and optimizer state before the first step.
        self._undo: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] | None = None
        self.fitting_novel = False  # after training: only novel clients are fitted
        self.sequential = params.hn_update == "sequential"

    # -- state ------------------------------------------------------------------------
    def build_hypernetwork(self) -> HyperNetwork:
        """The hypernetwork (before any client is registered)."""
        return HyperNetwork.from_config(self.params).to(self.device)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The hypernetwork optimizer: Adam with ``hn-lr`` (PAPER.md)."""
        return torch.optim.Adam(params, lr=self.params.hn_lr, fused=True)

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
        if self.params.hn_init == "reference":
            order = sorted(clients.names, key=natural_key)
            reference_init_(self.hn, order, self.params.seed)
            log(INFO, "Hypernetwork initialised in the reference order (%s first)",
                order[0])  # fmt: skip
        if self.params.hypernet_from:
            path = Path(self.params.hypernet_from).expanduser()
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
        return Array(encode_dense(vector, self.params.transfer))

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
        norm = torch.nn.utils.clip_grad_norm_(params, self.params.hn_grad_clip)
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

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """``delta`` of the client's ``K_i`` values (run-config ``transfer``)."""
        return {P.DELTA: Update(self.hn.num_params[client.name])}

    def read_reply(self, client: ClientInfo, arrays: dict[str, Any]) -> dict[str, Any]:
        """The deltas as float32 tensors (sharing the arrays' memory)."""
        return {key: torch.from_numpy(value) for key, value in arrays.items()}

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        """``mean``: one step on the example-weighted mean of the replies' VJPs."""
        total = sum(r.num_examples for r in replies)
        if total > 0:
            self.hn_step(
                [(r.client.name, r.arrays[P.DELTA], r.num_examples / total)
                 for r in replies]
            )  # fmt: skip

    # -- the sequential round ---------------------------------------------------------
    def window(self, num_clients: int) -> int:
        """Clients in flight at once in a sequential round (``hn-window``):
        client ``c_k`` trains a ``theta`` that includes the steps of
        ``c_1 .. c_{k-W}``; ``W = 1`` is the reference algorithm."""
        w = self.params.hn_window
        return num_clients if w == 0 else min(w, num_clients)

    def begin_ordered_round(self, server_round: int) -> None:
        """With ``min-train-clients`` > 1, keep what the round steps so that a
        round that ends short can be undone (:meth:`undo_round`; memory: one
        copy of what the round stepped)."""
        self._undo = {} if self.params.min_train_clients > 1 else None

    def apply_train_reply(self, server_round: int, reply: Reply) -> None:
        """One Adam step on the reply's VJP, taken at the current state."""
        self.hn_step([(reply.client.name, reply.arrays[P.DELTA], 1.0)])

    def end_ordered_round(
        self, server_round: int, replies: list[Reply], complete: bool
    ) -> None:
        """A round short of ``min-train-clients`` replies is undone bit for bit."""
        if not complete and self._undo is not None:
            self.undo_round()
        self._undo = None

    # -- clients that join after training ----------------------------------------
    def after_training(self, results_dir: Path) -> None:
        """Save the hypernetwork (``hypernet-from`` of a later run)."""
        self.hn.save(results_dir / HYPERNET_FILE)

    def begin_novel_phase(self) -> bool:
        """Freeze what training produced; fit the novel clients' embeddings.

        Extractor and the heads that training produced (or ``hypernet-from``
        loaded) are frozen. Only the novel clients' fresh embeddings, and a new
        head for a chunk count no trained head has, are fitted: Adam with
        ``novel-lr`` for ``novel-rounds`` rounds, applied like training rounds.
        """
        novel = {c.name for c in self.clients if c.novel}
        if not novel:
            return False
        trained = self.loaded_heads | {
            self.hn.head_of(n) for n in self.hn.num_params if n not in novel
        }
        self.hn.extractor.requires_grad_(False)
        fitted = [self.hn.embeddings[n] for n in sorted(novel)]
        for key, head in self.hn.heads.items():
            head.requires_grad_(key not in trained)
            if key not in trained:
                fitted += list(head.parameters())
        self.optimizer = torch.optim.Adam(fitted, lr=self.params.novel_lr, fused=True)
        self._theta_cache.clear()
        self.fitting_novel = True
        new_heads = sorted(set(self.hn.heads) - trained, key=int)
        log(INFO, "Novel clients: %d, new heads: %s", len(novel), new_heads or "none")
        return True
