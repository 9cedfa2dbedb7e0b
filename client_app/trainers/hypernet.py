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

from ..training import train_local
from .base import ClientTrainer, register_trainer


@register_trainer("mh-pfedhn")
class HypernetTrainer(ClientTrainer):
    """Trains the personalised model the hypernetwork generated for this client."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        client = self.client
        theta = content[P.ARRAYS][P.THETA].numpy()
        load_flat_(client.model, theta)
        x, y = client.train_tensors()
        stats = train_local(
            client.model, x, y, client.hparams, client.generator(server_round)
        )
        trained = flatten_params(client.model).cpu().numpy()
        delta = np.ascontiguousarray(theta.astype(np.float32) - trained)
        return self.reply(
            {
                P.NUM_EXAMPLES: stats.num_examples,
                P.LOSS: stats.loss,
                P.SECONDS: stats.seconds,
            },
            **{P.ARRAYS: ArrayRecord({P.DELTA: Array(delta)})},
        )
