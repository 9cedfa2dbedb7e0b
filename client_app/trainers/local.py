"""Client side of ``local``: train the kept personal model with cross-entropy."""

from __future__ import annotations

from flwr.app import RecordDict

from .base import PersonalTrainer, register_trainer


@register_trainer("local")
class LocalTrainer(PersonalTrainer):
    """Trains the client's own model; sends only metrics."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        stats = self.fit(self.client.model, server_round)
        return self.reply(self.train_metrics(stats))
