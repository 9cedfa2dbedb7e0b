"""Client side of ``fedgh``: the global header on the private extractor.

The received header (``head``, the flat ``Linear(D, C)``: ``C D + C`` values)
replaces ``model.head`` before training and before evaluation; the whole model
trains with cross-entropy; then the client's prototypes (per-class mean
features over its train split, eval mode; ``protos`` ``[C, D]``) and their class
counts (``proto-counts`` ``[C]``) go up. Evaluation: the model with the global
header.
"""

from __future__ import annotations

from flwr.app import RecordDict

from .base import register_trainer
from .fedproto import FedProtoTrainer


@register_trainer("fedgh")
class FedGHTrainer(FedProtoTrainer):
    """Trains under the global header with cross-entropy; uploads prototypes
    (the upload is FedProto's: :meth:`FedProtoTrainer.reply_prototypes`)."""

    def load_received(self, content: RecordDict) -> None:
        self.load_head(content)

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        self.load_received(content)
        return self.reply_prototypes(self.fit(self.client.model, server_round))

    def logits_fn(self, content: RecordDict) -> None:
        return None  # the model itself, with the global header loaded
