"""FedAvg (McMahan et al., 2017): one global model, averaged by examples.

Homogeneous only: ``models`` must name one architecture (a mixed list is a config
error). Each round every sampled client receives the global vector ``w``
(``theta``), trains it with cross-entropy and answers ``delta_i = w - w_i``; the
server sets ``w <- w - sum_i n_i delta_i / sum_i n_i``, which is the example-
weighted average of the trained models. Evaluation: the global model on each
client's local test split.

Deviation: BatchNorm statistics are not averaged; like every strategy here they
stay on the client (as in FedBN). The paper's five models have BatchNorm only in
the ResNets, which FedAvg (homogeneous) rarely uses here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common import protocol as P
from common.flat import flatten_params
from common.models import build_model

from ..engine.registry import ClientRegistry
from . import register_strategy
from .averaging import AveragingStrategy
from .base import Params


def initial_model_vector(name: str, clients: ClientRegistry, seed: int) -> np.ndarray:
    """Flat parameters of a freshly initialised ``name`` for the clients' task."""
    first = clients[clients.names[0]]
    torch.manual_seed(seed)
    model = build_model(name, first.num_classes, first.in_channels)
    return flatten_params(model).numpy()


@dataclass(frozen=True)
class FedAvgParams(Params):
    model_list: list[str]


@register_strategy("fedavg")
class FedAvg(AveragingStrategy):
    """Example-weighted averaging of one global model."""

    Params = FedAvgParams

    down_key, up_key, up_is_delta, what = P.THETA, P.DELTA, True, "global model"

    def initial_vector(self, clients: ClientRegistry) -> np.ndarray:
        vector = initial_model_vector(
            self.params.model_list[0], clients, self.params.seed
        )
        sizes = {c.name: c.num_params for c in clients if c.num_params != len(vector)}
        if sizes:
            raise ValueError(
                f"fedavg: clients {sizes} do not have the {len(vector)} parameters of "
                f"'{self.params.model_list[0]}'; every client must run that model"
            )
        return vector
