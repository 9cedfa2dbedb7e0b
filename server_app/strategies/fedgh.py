"""FedGH (Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized
Global Header", ACM MM 2023): a global header trained on the server from the
clients' class prototypes.

Every client keeps its own extractor ``f_i`` (``model.features``, ``D`` wide).
Each round it replaces its head with the global header ``g`` (a
``Linear(D, C)``), trains the whole model with ``CE(g(f_i(x)), y)``, and uploads
its prototypes ``proto_{i,c} = mean_{j: y_j = c} f_i(x_j)`` over its train split
(eval mode). The server then trains ``g`` on the pairs ``(proto_{i,c}, c)``, one
per client and held class, for ``server-epochs`` epochs:

    min_g  mean_{(p, c) in batch} CE(g(p), c)

with plain SGD (lr ``server-lr``, a fresh optimizer each round), mini-batches of
10, reshuffled every epoch. Evaluation: the client's extractor with the global
header.

Wire: down ``head`` (the flat header, weight then bias: ``C D + C`` values, 650
for 10 classes and ``D`` = 64), nothing in round 1; up ``protos`` ``[C, D]``
float32 and ``proto-counts`` ``[C]`` (examples per class, 0 = absent).

Follows HtFLlib's ``servergh.py`` / ``clientgh.py`` (``server_learning_rate``
0.01, ``server_epochs`` 100, server batch = HtFLlib's ``batch_size`` default
10), except:

- local training uses this app's shared settings (``client-lr``,
  ``batch-size``, ``local-epochs``, momentum, weight decay, gradient clipping),
  not HtFLlib's SGD lr 0.01 and batch 10, for a fair comparison;
- the server has no header before the first uploads (it learns ``D`` from
  them), so round 1 sends nothing and clients train their own initial heads;
  the header is then initialised with PyTorch's default ``Linear`` init seeded
  by ``seed``, where HtFLlib copies the first client's initial head;
- the server batch size is fixed at HtFLlib's default 10 rather than tied to
  the local batch size (HtFLlib uses one ``batch_size`` for both);
- HtFLlib's simulated client drop-out (``client_drop_rate``) is not modelled.
"""

from __future__ import annotations

from logging import INFO

import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log
from torch import nn

from common import protocol as P
from common.flat import flatten_params

from ..engine.registry import ClientInfo
from . import register_strategy
from .prototypes import (
    ClientPrototypes,
    PrototypeStrategy,
    ServerTrainingParams,
    prototype_pairs,
    round_generator,
    seeded_module,
    train_on_pairs,
)


def header_loss(
    header: nn.Module, protos: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``CE(g(p), c)`` averaged over the batch."""
    return F.cross_entropy(header(protos), labels)


@register_strategy("fedgh")
class FedGH(PrototypeStrategy):
    """A global header trained on the uploaded prototypes."""

    Params = ServerTrainingParams

    checkpoint_attributes = (*PrototypeStrategy.checkpoint_attributes, "header")

    def __init__(self, params) -> None:
        super().__init__(params)
        self.header: nn.Linear | None = None
        self.server_loss = float("nan")

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        if self.header is None:
            return RecordDict()
        head = flatten_params(self.header).numpy()
        return RecordDict({P.ARRAYS: ArrayRecord({P.HEAD: Array(head)})})

    def build_module(self, attr: str) -> nn.Linear:
        """The header, once ``D`` is known (seeded by ``seed``)."""
        dim, classes = self.feature_dim, self.num_classes
        assert attr == "header" and dim is not None
        return seeded_module(self.params.seed, lambda: nn.Linear(dim, classes))

    def update(self, server_round: int, uploads: list[ClientPrototypes]) -> None:
        if self.header is None:
            self.header = self.build_module("header")
        x, y = prototype_pairs(uploads)
        self.server_loss = train_on_pairs(
            self.header,
            x,
            y,
            header_loss,
            self.params.server_epochs,
            self.params.server_lr,
            round_generator(self.params.seed, server_round),
        )
        log(INFO, "round %d: global header trained on %d prototypes, loss %.4f",
            server_round, len(y), self.server_loss)  # fmt: skip
