"""FedDistill (Jeong et al., "Communication-efficient on-device machine learning:
federated distillation and augmentation", 2018; HtFLlib's ``FD``): clients share
per-class mean logits instead of parameters.

Every client keeps its own model (any architecture). In round ``r`` client ``i``
trains it on its local split with (HtFLlib ``clientFD.train``)::

    L = CE(z, y) + lambda * (1 / B) sum_{b: g_{y_b} exists} CE(z_b, softmax(g_{y_b}))

``z`` the logits of the batch of ``B``, ``CE(z_b, q) = -sum_c q_c log
softmax(z_b)_c``, ``lambda = reg-lambda`` (HtFLlib's ``lamda``, default 1.0) and
``g_c`` the global logits of class ``c`` from the previous round (round 1: plain
cross-entropy). While training it sums the logits of every training example per
class (train mode, the model as it is at that batch, over all local epochs, as
HtFLlib) and uploads their means ``l_{i,c}`` with its per-class example counts
``n_{i,c}``. The server sets, for every class some replying client holds,
``g_c = mean_{i: n_{i,c} > 0} l_{i,c}`` (unweighted over clients, HtFLlib's
``logit_aggregation``; :func:`~server_app.strategies.aggregate.class_mean`), from
this round's replies only. Evaluation: the personal model.

Wire: down (train messages from round 2; evaluation messages carry no arrays)
``logits`` float32 ``[C, C]`` (row ``c`` = ``g_c``, zero for classes nobody
holds) and ``proto-counts`` float32 ``[C]`` (the holding clients' total examples
of each class; 0 = no global logits); up ``logits`` ``[C, C]`` (``l_{i,c}``, zero
rows for absent classes) and ``proto-counts`` ``[C]`` (``n_{i,c}``).

Deviations from HtFLlib (``clientfd.py``, ``serverfd.py``, ``main.py``):

- local training uses this app's settings for every strategy (SGD with momentum
  and weight decay, gradient clipping, ``client-lr``, ``batch-size``,
  ``local-epochs``; HtFLlib: plain SGD, lr 0.01, batch 10);
- the regulariser is HtFLlib's latest form (soft-label cross-entropy against
  ``softmax(g_y)``; its older ``clientdistill.py`` used ``MSE(g_y, z)`` and an
  intermediate version the raw logits as soft labels). HtFLlib also adds, for
  samples whose class has no global logits, ``CE(z_b, softmax(z_b.detach()))``,
  which has zero gradient; it is left out, so the gradient is identical and only
  the reported loss lacks those constant terms.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log

from common import protocol as P

from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Dense, Expect, Reply
from . import register_strategy
from .aggregate import class_mean
from .base import Algorithm


@register_strategy("fd")
class FedDistill(Algorithm):
    """Per-class mean logits, averaged over the clients holding each class."""

    checkpoint_attributes = ("logits", "counts")

    def __init__(self, params) -> None:
        super().__init__(params)
        self.num_classes = 0
        self.logits: np.ndarray | None = None
        self.counts: np.ndarray | None = None

    def setup(self, clients: ClientRegistry) -> None:
        self.num_classes = clients[clients.names[0]].num_classes
        self.logits = self.counts = None

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        if self.logits is None or self.counts is None:
            return RecordDict()
        arrays = {P.LOGITS: Array(self.logits), P.PROTO_COUNTS: Array(self.counts)}
        return RecordDict({P.ARRAYS: ArrayRecord(arrays)})

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Nothing: evaluation uses the kept personal model only."""
        return RecordDict()

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """``logits`` ``[C, C]`` and ``proto-counts`` ``[C]``, finite floats."""
        c = self.num_classes
        return {P.LOGITS: Dense((c, c)), P.PROTO_COUNTS: Dense((c,))}

    def read_reply(self, client: ClientInfo, arrays: dict[str, Any]) -> dict[str, Any]:
        """Counts must be non-negative."""
        if (arrays[P.PROTO_COUNTS] < 0).any():
            raise ValueError(f"negative class counts in '{P.PROTO_COUNTS}'")
        return arrays

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        tables = [r.arrays[P.LOGITS] for r in replies]
        counts = [r.arrays[P.PROTO_COUNTS] for r in replies]
        if not tables:
            log(WARNING, "round %d: no usable logits; global logits unchanged",
                server_round)  # fmt: skip
            return
        self.logits, present = class_mean(tables, counts, weighted=False)
        total = np.sum(counts, axis=0, dtype=np.float64)
        self.counts = np.where(present, total, 0.0).astype(np.float32)
