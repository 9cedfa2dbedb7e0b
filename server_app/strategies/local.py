"""Local: every client trains its own model alone; nothing is shared.

The floor every federated method must beat. Loss: cross-entropy. Wire: nothing
but the round number down and the training metrics up; the server only
schedules rounds and collects the evaluation. Same as HtFLlib's ``Local``.
"""

from __future__ import annotations

from flwr.app import RecordDict

from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Reply
from . import register_strategy
from .base import Algorithm


@register_strategy("local")
class Local(Algorithm):
    """Clients train alone; the server holds no model."""

    def setup(self, clients: ClientRegistry) -> None:
        """Nothing to build."""

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        return RecordDict()

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        """Nothing to aggregate."""
