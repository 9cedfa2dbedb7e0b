"""Client side of ``lg-fedavg``: global head on the private extractor.

The received head (``head``) replaces ``model.head`` before training and
evaluation; the whole model trains with cross-entropy; the trained head goes up.
"""

from __future__ import annotations

from flwr.app import RecordDict

from common import protocol as P
from common.flat import flatten_params

from .base import PersonalTrainer, register_trainer


@register_trainer("lg-fedavg")
class LGFedAvgTrainer(PersonalTrainer):
    """Trains the personal model under the global head; uploads the head."""

    def load_received(self, content: RecordDict) -> None:
        self.load_head(content)

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        self.load_received(content)
        stats = self.fit(self.client.model, server_round)
        head = flatten_params(self.client.model.head).cpu().numpy()
        return self.reply(self.train_metrics(stats), **{P.HEAD: head})
