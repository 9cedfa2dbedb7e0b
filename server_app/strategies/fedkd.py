"""FedKD (Wu et al., "Communication-efficient federated learning via knowledge
distillation", Nature Communications 2022): adaptive mutual distillation between a
personal teacher and a shared student, with SVD-compressed student updates.

Every client keeps its personal model (the teacher, "mentor"; any architecture
whose ``features(x)`` is a ``[B, D_t]`` vector) and a projection ``W_h``
(``Linear(D_s, D_t, bias=False)``, PyTorch's default initialisation, kept in the
node state). The server holds the student ("mentee", architecture
``global-model``, default ``cnn``), initialised once (seeded). Each round a
client trains teacher ``t``, student ``s`` and ``W_h`` together on each
mini-batch, with hidden representations ``h = features(x)``, logits ``z`` and
(HtFLlib ``clientKD.train``)::

    S   = CE(z_t, y) + CE(z_s, y)
    L_t = CE(z_t, y) + KL(softmax(z_s) || softmax(z_t)) / S + MSE(h_t, W_h h_s) / S
    L_s = CE(z_s, y) + KL(softmax(z_t) || softmax(z_s)) / S + MSE(h_t, W_h h_s) / S

KL at temperature 1, summed over classes and divided by ``B * C``, MSE the mean
over ``B * D_t`` (HtFLlib's ``nn.KLDivLoss()`` and ``nn.MSELoss()``). HtFLlib
back-propagates ``L_t`` and then ``L_s`` into the same gradients and detaches
nothing (neither softmax target, nor ``S``), so teacher, student and ``W_h`` all
get the gradient of ``L_t + L_s``; here the loop back-propagates ``L_t + L_s``
once, which is the same.

Compression (:mod:`common.lowrank`; HtFLlib ``decomposition`` / ``recover``): in
round ``r`` of ``R`` the energy is ``e_r = fedkd-energy-start + (r - 1) / (R - 1)
* (fedkd-energy-end - fedkd-energy-start)`` (0.95 -> 0.98). The client uploads its
trained student with every weight matrix truncated to the smallest rank keeping
more than ``e_r`` of its squared singular values; the server rebuilds each
upload, averages them weighted by examples, truncates the average again with
``e_r`` and sends that (compressed) to every client in round ``r + 1``; its own
copy of the student is the truncated one the clients rebuild. Round 1 sends the
initial student dense (HtFLlib copies it to the clients uncompressed at start).
Evaluation: the personal (teacher) model only.

Wire (train messages; evaluation messages carry no arrays):

- down, round 1: ``shared`` (flat float32 ``[K_s]``; 234,006 for ``cnn`` on
  CIFAR-10);
- down, later rounds, and up every round: ``shared-factors`` (float32 ``[L]``)
  and ``shared-ranks`` (int32 ``[T]``, one per parameter tensor of the student:
  ``k >= 1`` = the matrix travels as ``U_k [m, k]``, ``s_k [k]``, ``V_k^T [k, n]``;
  0 = dense), laid out as in :mod:`common.lowrank`; up with ``num-examples``.

Deviations from HtFLlib (``clientkd.py``, ``serverkd.py``, ``main.py``):

- local training uses this app's settings for every strategy (SGD with momentum
  and weight decay, ``client-lr``, ``batch-size``, ``local-epochs``; HtFLlib: plain
  SGD, lr 0.01, batch 10), with one optimizer over teacher, student and ``W_h``
  (HtFLlib: one each, all at the client lr -- its ``mentee_learning_rate`` is
  read but unused -- so the student uses ``client-lr`` here too), and each of
  the three's gradient norm clipped on its own at ``client-grad-clip`` (HtFLlib:
  at 10);
- a convolution kernel ``[out, in, kh, kw]`` is decomposed as one
  ``[out, in*kh*kw]`` matrix; HtFLlib runs a batched SVD of every ``kh x kw``
  slice (with a joint energy threshold), whose factors are larger than the
  kernel itself, so it cannot shrink the message;
- a matrix travels dense and exact when its factors would not be smaller
  (``k (m + n + 1) >= m n``); HtFLlib always sends the truncated factors;
- the rank is capped at full rank: when no ``k`` below full rank exceeds the
  energy, HtFLlib's loop keeps rank 0 and zeroes the matrix;
- averages are weighted by examples (FedAvg); HtFLlib averages uniformly;
- the student's architecture is ``global-model`` (HtFLlib: its ``global_model``
  argument, else the first client architecture); ``W_h`` maps the student's
  ``D_s`` features to the teacher's ``D_t`` (HtFLlib: ``feature_dim`` square);
- BatchNorm statistics of the student (none for ``cnn``) are not shared or kept:
  the student only ever runs in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log

from common import lowrank
from common import protocol as P
from common.models import build_model

from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Dense, Expect, Reply
from . import register_strategy
from .aggregate import weighted_mean
from .base import Algorithm, Params
from .fedavg import initial_model_vector


@dataclass(frozen=True)
class FedKDParams(Params):
    global_model: str
    num_server_rounds: int
    fedkd_energy_start: float
    fedkd_energy_end: float


@register_strategy("fedkd")
class FedKD(Algorithm):
    """Example-weighted average of SVD-compressed students."""

    Params = FedKDParams

    checkpoint_attributes = ("vector", "factors", "ranks")

    def __init__(self, params) -> None:
        super().__init__(params)
        self.shapes: list[tuple[int, ...]] = []
        self.vector: np.ndarray | None = None
        self.factors: np.ndarray | None = None
        self.ranks: np.ndarray | None = None

    def setup(self, clients: ClientRegistry) -> None:
        first = clients[clients.names[0]]
        model = build_model(
            self.params.global_model, first.num_classes, first.in_channels
        )
        self.shapes = lowrank.param_shapes(model)
        self.vector = initial_model_vector(
            self.params.global_model, clients, self.params.seed
        )
        self.factors = self.ranks = None

    def energy(self, server_round: int) -> float:
        p = self.params
        return lowrank.energy_at(
            server_round,
            p.num_server_rounds,
            p.fedkd_energy_start,
            p.fedkd_energy_end,
        )

    def summary(self) -> None:
        log(INFO, "Strategy fedkd with %d clients: student '%s' (%d parameters), "
            "energy %.3f -> %.3f", len(self.clients), self.params.global_model,
            len(self.vector) if self.vector is not None else 0,
            self.energy(1), self.energy(self.params.num_server_rounds))  # fmt: skip

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        if self.factors is None or self.ranks is None:
            assert self.vector is not None
            arrays = {P.SHARED: Array(self.vector)}
        else:
            arrays = {
                lowrank.FACTORS: Array(self.factors),
                lowrank.RANKS: Array(self.ranks),
            }
        return RecordDict({P.ARRAYS: ArrayRecord(arrays)})

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Nothing: evaluation uses the kept personal model only."""
        return RecordDict()

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """``shared-factors`` (floats) and ``shared-ranks`` (integers)."""
        return {
            lowrank.FACTORS: Dense((None,)),
            lowrank.RANKS: Dense(integer=True),
        }

    def read_reply(self, client: ClientInfo, arrays: dict[str, Any]) -> dict[str, Any]:
        """The student the factors encode, rebuilt (``ValueError`` if they do
        not fit its shapes)."""
        factors, ranks = arrays[lowrank.FACTORS], arrays[lowrank.RANKS]
        return {P.SHARED: lowrank.decompress(factors, ranks, self.shapes)}

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        uploads = [(r.arrays[P.SHARED], r.num_examples) for r in replies]
        if not uploads:
            log(WARNING, "round %d: no usable student; unchanged", server_round)
            return
        mean = weighted_mean([s for s, _ in uploads], [n for _, n in uploads])
        energy = self.energy(server_round)
        self.factors, self.ranks = lowrank.compress(mean, self.shapes, energy)
        self.vector = lowrank.decompress(self.factors, self.ranks, self.shapes)
