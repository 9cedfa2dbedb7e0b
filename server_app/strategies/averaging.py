"""A server that keeps one flat vector and averages it from the replies.

The common core of FedAvg (the whole model), LG-FedAvg (the classifier head) and
FML (the shared model): each round the server sends its vector ``v`` under
``down_key`` (nothing while it is unknown), every client answers ``up_key`` and
the number ``n_i`` of examples it trained on, and the server sets

    v <- sum_i n_i u_i / sum_i n_i          (u_i the uploaded vectors), or
    v <- v - sum_i n_i d_i / sum_i n_i      (``up_is_delta``: d_i = v - v_i).
"""

from __future__ import annotations

from logging import WARNING
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log

from common import protocol as P

from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Dense, Expect, Reply
from .aggregate import weighted_mean
from .base import Algorithm


class SharedVectorMismatch(ValueError):
    """Clients uploaded vectors of different lengths: the setting cannot work."""


class AveragingStrategy(Algorithm):
    """Base: one shared vector, sent down and averaged from the replies."""

    down_key: ClassVar[str] = P.THETA
    up_key: ClassVar[str] = P.DELTA
    up_is_delta: ClassVar[bool] = False
    #: What the vector is, for messages ("global model", "head", ...).
    what: ClassVar[str] = "shared vector"
    checkpoint_attributes = ("vector",)

    def __init__(self, params) -> None:
        super().__init__(params)
        self.vector: np.ndarray | None = None

    def initial_vector(self, clients: ClientRegistry) -> np.ndarray | None:
        """The vector before round 1 (``None``: learnt from the first replies)."""
        return None

    def setup(self, clients: ClientRegistry) -> None:
        self.vector = self.initial_vector(clients)

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        if self.vector is None:
            return RecordDict()
        return RecordDict({P.ARRAYS: ArrayRecord({self.down_key: Array(self.vector)})})

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """``up_key``: a vector of the shared vector's length (any length while
        it is unknown)."""
        shape = (None,) if self.vector is None else self.vector.shape
        return {self.up_key: Dense(shape, delta=self.up_is_delta)}

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        uploads = [
            (r.client.name, r.arrays[self.up_key], r.num_examples) for r in replies
        ]
        if not uploads:
            log(WARNING, "round %d: no usable %s; %s unchanged", server_round,
                self.up_key, self.what)  # fmt: skip
            return
        lengths = {name: len(value) for name, value, _ in uploads}
        if len(set(lengths.values())) > 1:
            raise SharedVectorMismatch(
                f"strategy '{self.name}' shares one {self.what} between all clients, "
                f"but their {self.what}s differ in size: "
                + ", ".join(f"{n}: {k}" for n, k in sorted(lengths.items()))
                + ". Use models whose shared part has the same shape (the paper's "
                "five models all end in a 64-wide feature layer)"
            )
        mean = weighted_mean([v for _, v, _ in uploads], [n for _, _, n in uploads])
        if self.up_is_delta:
            assert self.vector is not None
            mean = self.vector - mean
        self.vector = mean
