"""Client side of MH-pFedHN: train the generated model, answer with the delta.

The client loads ``theta_i`` into its own architecture (BatchNorm statistics come
from its kept state), trains it locally with cross-entropy, and returns
``delta_i = theta_i - theta_i_trained``, which the server backpropagates through
the hypernetwork.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.flat import flatten_params, load_flat_

from ..training import LossFn, TrainStats, cross_entropy_loss, train_local
from .base import ClientTrainer, register_trainer


@register_trainer("mh-pfedhn")
class HypernetTrainer(ClientTrainer):
    """Trains the personalised model the hypernetwork generated for this client."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        delta, stats = self.train_personal(content, server_round)
        return self.reply(
            {
                P.NUM_EXAMPLES: stats.num_examples,
                P.LOSS: stats.loss,
                P.SECONDS: stats.seconds,
            },
            **{P.ARRAYS: ArrayRecord({P.DELTA: Array(delta)})},
        )

    def train_personal(
        self,
        content: RecordDict,
        server_round: int,
        loss_fn: LossFn = cross_entropy_loss,
    ) -> tuple[np.ndarray, TrainStats]:
        """Load ``theta``, train it locally, return ``theta - theta_trained``."""
        client = self.client
        theta = content[P.ARRAYS][P.THETA].numpy()
        load_flat_(client.model, theta)
        x, y = client.train_tensors()
        stats = train_local(
            client.model, x, y, client.hparams, client.generator(server_round), loss_fn
        )
        trained = flatten_params(client.model).cpu().numpy()
        return np.ascontiguousarray(theta.astype(np.float32) - trained), stats
