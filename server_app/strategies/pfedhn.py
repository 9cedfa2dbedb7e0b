"""pFedHN (Shamsian et al., "Personalized Federated Learning using Hypernetworks",
ICML 2021): the homogeneous hypernetwork MH-pFedHN extends.

One embedding vector per client, a shared MLP and one linear head per target
tensor (:mod:`server_app.hypernet.per_tensor`). The round is MH-pFedHN's (same client
trainer, same ``hn-update`` / ``hn-window`` scheduling): the client trains the
generated ``theta_i`` and answers ``delta_i = theta_i - theta_i_trained``; the
server takes the VJP ``(d theta_i / d phi)^T delta_i``, clips it to
``hn-grad-clip`` (50) and steps SGD (``pfedhn-lr`` 1e-2, momentum 0.9,
``pfedhn-weight-decay`` 1e-3): pFedHN's defaults. Embedding size
``pfedhn-embed-dim`` (0: ``1 + clients // 4``, pFedHN's rule), width
``pfedhn-hidden-dim`` (100), ``hidden-layers`` (3) hidden layers.

Wire: ``theta`` down, ``delta`` up (``K`` float32 values each), as MH-pFedHN.

Deviations from the pFedHN code: a client trains ``local-epochs`` epochs (1 by
default, about pFedHN's 50 inner steps of 64 examples on these partitions) with
the shared local settings, so every strategy here trains alike; rounds visit
clients per ``fraction-train`` rather than one random client per step;
BatchNorm statistics stay on the client. Homogeneous only (a config error
otherwise). The published numbers (CIFAR-10 88.38, CIFAR-100 59.48 with 50
clients) used pFedHN's LeNet-style CNN; here the target is ``models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import torch
from flwr.common.logger import log

from common.flat import trainable_params
from common.models import build_model

from ..engine.registry import ClientRegistry
from ..hypernet import PerTensorHyperNetwork
from . import register_strategy
from .mh_pfedhn import MHPFedHN, MHPFedHNParams


@dataclass(frozen=True)
class PFedHNParams(MHPFedHNParams):
    model_list: list[str]
    pfedhn_embed_dim: int
    pfedhn_hidden_dim: int
    pfedhn_lr: float
    pfedhn_weight_decay: float


@register_strategy("pfedhn")
class PFedHN(MHPFedHN):
    """pFedHN: per-tensor heads, SGD; the rest of the round is MH-pFedHN's."""

    Params = PFedHNParams

    def build_hypernetwork(self) -> None:
        """Built in :meth:`setup`: it needs the architecture and the client count."""
        return None

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params,
            lr=self.params.pfedhn_lr,
            momentum=0.9,
            weight_decay=self.params.pfedhn_weight_decay,
        )

    def setup(self, clients: ClientRegistry) -> None:
        p = self.params
        first = clients[clients.names[0]]
        model = build_model(p.model_list[0], first.num_classes, first.in_channels)
        sizes = [w.numel() for w in trainable_params(model)]
        embed_dim = p.pfedhn_embed_dim or 1 + len(clients) // 4
        torch.manual_seed(p.seed)
        self.hn = PerTensorHyperNetwork(
            sizes, embed_dim, p.pfedhn_hidden_dim, p.hidden_layers
        ).to(self.device)
        log(INFO, "pFedHN: %d target tensors, embedding size %d", len(sizes),
            embed_dim)  # fmt: skip
        super().setup(clients)
