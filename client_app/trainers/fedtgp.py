"""Client side of ``fedtgp``: exactly the ``fedproto`` client.

HtFLlib's ``clientTGP`` trains with FedProto's loss against the server's
trainable global prototypes and uploads per-class mean features computed after
training in eval mode, which is what :class:`FedProtoTrainer` does; evaluation
is by the nearest global prototype.
"""

from __future__ import annotations

from .base import register_trainer
from .fedproto import FedProtoTrainer


@register_trainer("fedtgp")
class FedTGPTrainer(FedProtoTrainer):
    """FedProto's client against the server's trained prototypes."""
