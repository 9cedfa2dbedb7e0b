"""FedTGP (Zhang et al., "FedTGP: Trainable Global Prototypes with Adaptive-Margin-
Enhanced Contrastive Learning for Data and Model Heterogeneity in Federated
Learning", AAAI 2024): global prototypes learnt on the server.

Clients are FedProto's (:mod:`server_app.strategies.fedproto`): they train with
``CE + lambda * (1 / (B D)) sum_j ||f_i(x_j) - p_{y_j}||^2`` against the global
prototypes ``p_c`` and upload their prototypes ``proto_{i,c}`` (per-class mean
features over the train split, eval mode); they predict the nearest global
prototype.

The server holds a generator ``G`` (HtFLlib's ``Trainable_prototypes``):
``p_c = W2 relu(W1 e_c + b1) + b2`` with ``e_c`` a row of an
``Embedding(C, D)``, ``W1: D -> H``, ``W2: H -> D`` and ``H = D``. Each round:

1. adaptive margin: with ``a_c`` the unweighted mean of the uploaded
   ``proto_{i,c}`` over the clients holding ``c``,
   ``gap_c = min_{k != c} ||a_c - a_k||_2`` over the uploaded classes and
   ``margin = min(max_c gap_c, tgp-margin)`` (``tgp-margin`` alone when fewer
   than two classes were uploaded) -- :func:`adaptive_margin`;
2. ``server-epochs`` epochs of plain SGD (lr ``server-lr``, a fresh optimizer
   each round, mini-batches of 10 reshuffled every epoch) over the pairs
   ``(proto_{i,c}, c)``, one per client and held class, on

       L = mean_{(q, c) in batch} CE(-d(q) - margin * onehot(c), c),
       d_k(q) = ||q - G(k)||_2 for every class k

   (:func:`tgp_loss`): each uploaded prototype is pulled towards its class's
   generated prototype and pushed away from the others by at least the margin;
3. ``p_c = G(c)`` (eval mode, detached) for *every* class ``c`` becomes the
   global prototypes (as HtFLlib: classes nobody uploaded get their generated
   prototype too).

Wire: down ``protos`` ``[C, D]`` float32 and ``proto-counts`` ``[C]`` (0/1
present mask: all ones once ``G`` exists), nothing in round 1; up ``protos``
``[C, D]`` and ``proto-counts`` ``[C]`` (examples per class, 0 = absent).

Follows HtFLlib's ``servertgp.py`` / ``clienttgp.py`` (``lamda`` 1.0,
``server_epochs`` 100, ``margin_threthold`` 100, ``server_hidden_dim`` =
``feature_dim``, server batch = HtFLlib's ``batch_size`` default 10), except:

- local training uses this app's shared settings (``client-lr``,
  ``batch-size``, ``local-epochs``, momentum, weight decay, gradient clipping),
  not HtFLlib's SGD lr 0.01 and batch 10, for a fair comparison;
- the server learning rate is ``server-lr`` (default 0.01); HtFLlib uses its
  local learning rate (default also 0.01) for the server;
- the server batch size is fixed at HtFLlib's default 10 rather than tied to
  the local batch size;
- ``G`` is built at the first uploads (``D`` is learnt from them: 64 for the
  paper's five models, where HtFLlib's ``feature_dim`` default is 512), with
  PyTorch's default init seeded by ``seed``;
- the squared distances are clamped at ``1e-12`` before the square root, so a
  rounding error cannot turn them into NaN (HtFLlib takes the root directly);
- before the first server update (no global prototypes) a client predicts
  with its own head; HtFLlib counts that evaluation as 0 correct;
- the evaluation loss is the cross-entropy of the negative squared distances
  (HtFLlib reports none).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common.logger import log
from torch import nn

from . import register_strategy
from .prototypes import (
    ClientPrototypes,
    PrototypeStrategy,
    ServerTrainingParams,
    prototype_pairs,
    round_generator,
    seeded_module,
    train_on_pairs,
)


class TrainablePrototypes(nn.Module):
    """HtFLlib's ``Trainable_prototypes``: ``Embedding(C, D)`` -> ``Linear(D, H)``
    -> ReLU -> ``Linear(H, D)``; ``forward()`` gives all ``[C, D]`` prototypes."""

    def __init__(self, num_classes: int, feature_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(num_classes, feature_dim)
        self.middle = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.fc = nn.Linear(hidden_dim, feature_dim)

    def forward(self) -> torch.Tensor:
        return self.fc(self.middle(self.embeddings.weight))


def adaptive_margin(means: np.ndarray, present: np.ndarray, threshold: float) -> float:
    """``min(max_c min_{k != c} ||a_c - a_k||_2, threshold)`` over present classes.

    ``means`` ``[C, D]``: the per-class mean of the uploaded prototypes;
    ``present`` ``[C]``: the classes uploaded. With fewer than two present
    classes there is no gap and the result is ``threshold`` (as in HtFLlib,
    where every gap then stays at its initial 1e9).
    """
    a = np.asarray(means, dtype=np.float64)[np.asarray(present, dtype=bool)]
    if len(a) < 2:
        return float(threshold)
    dist = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(axis=2))
    np.fill_diagonal(dist, np.inf)
    return float(min(dist.min(axis=1).max(), threshold))


def tgp_loss(
    protos: torch.Tensor,
    labels: torch.Tensor,
    generated: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """``mean CE(-(d + margin * onehot(y)), y)`` with ``d`` ``[B, C]`` the
    Euclidean distances of the uploaded ``protos`` ``[B, D]`` to the
    ``generated`` ``[C, D]`` (HtFLlib's expansion ``|q|^2 - 2 q.p + |p|^2``)."""
    sq = (
        protos.pow(2).sum(1, keepdim=True)
        - 2 * protos @ generated.T
        + generated.pow(2).sum(1, keepdim=True).T
    )
    dist = sq.clamp_min(1e-12).sqrt()
    dist = dist + margin * F.one_hot(labels, generated.shape[0]).to(dist.dtype)
    return F.cross_entropy(-dist, labels)


@dataclass(frozen=True)
class FedTGPParams(ServerTrainingParams):
    tgp_margin: float


@register_strategy("fedtgp")
class FedTGP(PrototypeStrategy):
    """Global prototypes from a generator trained with an adaptive margin."""

    Params = FedTGPParams

    checkpoint_attributes = (*PrototypeStrategy.checkpoint_attributes, "generator")

    def __init__(self, params) -> None:
        super().__init__(params)
        self.generator: TrainablePrototypes | None = None
        self.margin = float("nan")
        self.server_loss = float("nan")

    def build_module(self, attr: str) -> TrainablePrototypes:
        """The generator, once ``D`` is known (seeded by ``seed``)."""
        classes, dim = self.num_classes, self.feature_dim
        assert attr == "generator" and dim is not None
        return seeded_module(
            self.params.seed, lambda: TrainablePrototypes(classes, dim, dim)
        )

    def update(self, server_round: int, uploads: list[ClientPrototypes]) -> None:
        if self.generator is None:
            self.generator = self.build_module("generator")
        self.margin = adaptive_margin(
            *self.mean_prototypes(uploads), self.params.tgp_margin
        )
        margin = self.margin
        x, y = prototype_pairs(uploads)
        self.server_loss = train_on_pairs(
            self.generator,
            x,
            y,
            lambda gen, q, c: tgp_loss(q, c, gen(), margin),
            self.params.server_epochs,
            self.params.server_lr,
            round_generator(self.params.seed, server_round),
        )
        with torch.no_grad():
            self.global_protos = self.generator().numpy().astype(np.float32)
        self.present = np.ones(self.num_classes, dtype=bool)
        log(INFO, "round %d: prototype generator trained on %d prototypes, margin "
            "%.4f, loss %.4f", server_round, len(y), self.margin,
            self.server_loss)  # fmt: skip
