"""Client side of a strategy: what a TRAIN or EVALUATE message makes a client do.

Each strategy that trains differently on the client has one trainer module,
registered under the strategy's name, so the ClientApp stays strategy-agnostic.
The shared loops live in :mod:`client_app.training`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common import protocol as P
from common.flat import load_flat_

from ..local import LocalClient
from ..training import evaluate_local


class ClientTrainer(ABC):
    """Handles the TRAIN and EVALUATE messages of one strategy on one client."""

    def __init__(self, client: LocalClient) -> None:
        self.client = client

    @abstractmethod
    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        """Train on the local split and return the reply content."""

    def evaluate_metrics(self, content: RecordDict) -> dict[str, float | int]:
        """Loss and accuracy counts of the model the server sent, on the test split."""
        theta = content[P.ARRAYS][P.THETA].numpy()
        load_flat_(self.client.model, theta)
        x, y = self.client.test_tensors()
        loss, correct, n = evaluate_local(self.client.model, x, y)
        return {P.NUM_EXAMPLES: n, P.CORRECT: correct, P.LOSS: loss}

    def evaluate(self, content: RecordDict, server_round: int) -> RecordDict:
        """Reply to an EVALUATE message."""
        return self.reply(self.evaluate_metrics(content))

    def reply(self, metrics: dict[str, float | int], **records) -> RecordDict:
        """Reply content carrying the client's name, its metrics and any records."""
        content = RecordDict(
            {
                P.INFO: ConfigRecord({P.CLIENT_NAME: self.client.name}),
                P.METRICS: MetricRecord(metrics),
            }
        )
        for key, record in records.items():
            content[key] = record
        return content


TRAINERS: dict[str, type[ClientTrainer]] = {}


def register_trainer(
    *names: str,
) -> Callable[[type[ClientTrainer]], type[ClientTrainer]]:
    """Class decorator: make a trainer handle the strategies called ``names``."""

    def decorator(cls: type[ClientTrainer]) -> type[ClientTrainer]:
        for name in names:
            TRAINERS[name] = cls
        return cls

    return decorator


def build_trainer(strategy: str, client: LocalClient) -> ClientTrainer:
    """The trainer registered for ``strategy``."""
    if strategy not in TRAINERS:
        raise ValueError(
            f"no client trainer for strategy '{strategy}'; "
            f"known: {', '.join(sorted(TRAINERS))}"
        )
    return TRAINERS[strategy](client)
