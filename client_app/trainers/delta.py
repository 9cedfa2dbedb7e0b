"""Client side of the strategies whose server sends the whole model every round.

MH-pFedHN (the hypernetwork's ``theta_i``), pFedHN (likewise) and FedAvg (the
global model): the client loads ``theta`` into its own architecture (BatchNorm
statistics come from its kept state), trains it locally with cross-entropy, and
returns ``delta = theta - theta_trained``. The hypernetwork strategies
backpropagate it through the hypernetwork; FedAvg averages it.

Run-config ``transfer`` (MH-pFedHN, MH-pFedHNGD; :mod:`common.transfer`): a
float16 ``theta`` is cast to float32 before training, so ``delta`` is taken
against the float32 vector the client actually trained from, and goes back as
float16 (``fp16``) or as its largest-magnitude entries (``topk``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from common import protocol as P
from common.flat import flatten_params
from common.transfer import encode_update

from ..training import LossFn, TrainStats, cross_entropy_loss
from .base import ClientTrainer, register_trainer


@register_trainer("mh-pfedhn", "pfedhn", "fedavg")
class DeltaTrainer(ClientTrainer):
    """Trains the model the server sent; answers with ``theta - theta_trained``."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        delta, stats = self.train_received(content, server_round)
        return self.reply(self.train_metrics(stats), **self.encode(P.DELTA, delta))

    def encode(self, key: str, delta: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays that send ``delta`` under base key ``key`` in the run's
        ``transfer`` encoding (:func:`common.transfer.encode_update`)."""
        cfg = self.client.cfg
        return encode_update(delta, key, cfg.transfer, cfg.topk_fraction)

    def train_received(
        self,
        content: RecordDict,
        server_round: int,
        loss_fn: LossFn = cross_entropy_loss,
    ) -> tuple[np.ndarray, TrainStats]:
        """Load ``theta``, train it locally, return ``theta - theta_trained``."""
        theta = self.received(content, P.THETA)
        self.load_received(content)
        stats = self.fit(self.client.model, server_round, loss_fn)
        trained = flatten_params(self.client.model).cpu().numpy()
        return theta - trained, stats
