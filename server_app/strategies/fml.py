"""FML (Shen et al., "Federated Mutual Learning", 2020): personal models and a
shared "meme" model that learn from each other; the meme is averaged.

Every client keeps its own personal model (any architecture). The server holds a
meme of architecture ``global-model`` (default ``cnn``), initialised once
(seeded, :func:`~server_app.strategies.fedavg.initial_model_vector`). Each round
a client loads the meme ``s`` next to its personal model ``p`` and trains both on
each mini-batch of its local split (deep mutual learning), with logits ``z_p``,
``z_s`` and (HtFLlib ``clientFML.train``)::

    L_p = alpha CE(z_p, y) + (1 - alpha) KL(softmax(z_s) || softmax(z_p))
    L_s = beta  CE(z_s, y) + (1 - beta)  KL(softmax(z_p) || softmax(z_s))

``alpha = fml-alpha``, ``beta = fml-beta`` (default 0.5 each, the FML paper's), KL
at temperature 1, summed over classes and divided by ``B * C`` (HtFLlib's
``nn.KLDivLoss()`` with its default ``'mean'`` reduction). HtFLlib back-propagates
``L_p`` and then ``L_s`` into the same gradients without detaching either softmax
target, so each model's gradient is that of ``L_p + L_s``; here the training loop
back-propagates ``L_p + L_s`` once, which is the same. The server then sets the
meme to the example-weighted mean of the uploaded memes
(:class:`~server_app.strategies.averaging.AveragingStrategy`). Evaluation: the
personal model only (so carried evaluation needs nothing from the server).

The defaults are the FML paper's alpha = beta = 0.5. HtFLlib's defaults
alpha = beta = 1 give the KL terms weight 0: each personal model then trains with
plain cross-entropy (exactly as under ``local``) and the meme is FedAvg of
cross-entropy-trained copies; set ``fml-alpha = 1.0`` / ``fml-beta = 1.0`` to run
that. Both must lie in [0, 1] (the losses are convex combinations; checked here).

Wire: down ``shared`` (the meme, flat float32 ``[K_s]``; 234,006 values for
``cnn`` on CIFAR-10) in train messages only (evaluation messages carry no
arrays); up ``shared`` (the trained meme, ``[K_s]``) with ``num-examples``.

Deviations from HtFLlib (``clientfml.py``, ``serverfml.py``, ``main.py``):

- local training uses this app's settings for every strategy (SGD with momentum
  and weight decay, ``client-lr``, ``batch-size``, ``local-epochs``; HtFLlib: plain
  SGD, lr 0.01, batch 10), one optimizer over both models with the same settings
  (HtFLlib: one per model with the same lr; SGD updates each parameter on its
  own, so this is the same), and each model's gradient norm clipped on its own at
  ``client-grad-clip`` (HtFLlib: at 10). So with ``fml-alpha = fml-beta = 1`` the
  personal model trains exactly as under ``local``;
- the meme is averaged weighted by examples (FedAvg); HtFLlib averages the
  uploaded memes uniformly;
- the meme's architecture is ``global-model``; HtFLlib uses the first client
  architecture with its own 512-wide feature layer;
- BatchNorm statistics of the meme (none for ``cnn``) are not shared or kept: the
  meme only ever runs in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from common import protocol as P

from ..engine.registry import ClientInfo, ClientRegistry
from . import register_strategy
from .averaging import AveragingStrategy
from .base import Params
from .fedavg import initial_model_vector


@dataclass(frozen=True)
class FMLParams(Params):
    global_model: str


@register_strategy("fml")
class FML(AveragingStrategy):
    """Mutual learning with an example-weighted average of the shared meme."""

    down_key, up_key, up_is_delta, what = P.SHARED, P.SHARED, False, "shared model"
    checkpoint_attributes = ("vector",)

    Params = FMLParams

    def initial_vector(self, clients: ClientRegistry) -> np.ndarray:
        return initial_model_vector(self.params.global_model, clients, self.params.seed)

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Nothing: evaluation uses the kept personal model only."""
        return RecordDict()
