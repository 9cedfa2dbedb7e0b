"""Client side of ``fedproto``: prototype-regularised training, prototypes up.

Before training, the received global prototypes (``protos`` ``[C, D]`` with the
0/1 mask ``proto-counts`` ``[C]``) define the loss
``CE(head(f(x)), y) + reg-lambda * (1 / (B D)) sum_{i: p_{y_i} exists}
||f(x_i) - p_{y_i}||^2`` (plain cross-entropy while there are none). After
training, the client's prototypes (per-class mean features over its train split,
eval mode) and their class counts go up. Evaluation: nearest global prototype,
or the model's own head while there are none. The math is in
:mod:`client_app.prototypes`.
"""

from __future__ import annotations

from flwr.app import RecordDict

from common import protocol as P

from ..prototypes import (
    local_prototypes,
    nearest_prototype_logits,
    prototype_loss,
    received_prototypes,
)
from ..training import LogitsFn, TrainStats
from .base import PersonalTrainer, register_trainer


@register_trainer("fedproto")
class FedProtoTrainer(PersonalTrainer):
    """Trains the personal model towards the global prototypes; uploads its own."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        client = self.client
        received = received_prototypes(content, client.device)
        protos, present = received if received is not None else (None, None)
        loss_fn = prototype_loss(protos, present, client.cfg.reg_lambda)
        stats = self.fit(client.model, server_round, loss_fn)
        return self.reply_prototypes(stats)

    def reply_prototypes(self, stats: TrainStats) -> RecordDict:
        """Train reply: metrics, local prototypes and their class counts."""
        client = self.client
        x, y = client.train_tensors()
        protos, counts = local_prototypes(client.model, x, y, client.data.num_classes)
        return self.reply(
            self.train_metrics(stats), **{P.PROTOS: protos, P.PROTO_COUNTS: counts}
        )

    def logits_fn(self, content: RecordDict) -> LogitsFn | None:
        received = received_prototypes(content, self.client.device)
        if received is None:
            return None  # no global prototypes yet: the model's own head
        return nearest_prototype_logits(*received)
