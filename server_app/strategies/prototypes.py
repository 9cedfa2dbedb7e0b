"""What the prototype-based strategies share: ``fedproto``, ``fedtgp``, ``fedgh``.

Each round every training client uploads its class prototypes ``protos``
(``[C, D]`` float32: per class the mean of its ``D``-wide penultimate features
over its train split) and ``proto-counts`` (``[C]``: examples behind each row, 0
= the client does not hold the class). :class:`PrototypeStrategy` reads and
declares them (:meth:`PrototypeStrategy.expects`, checked by the engine) and
hands the accepted ones to the strategy's :meth:`PrototypeStrategy.update`; by
default it sends the global prototypes down as ``protos`` ``[C, D]`` with the 0/1
present mask in ``proto-counts``.

Server-side training (FedTGP's prototype generator, FedGH's global header) runs
on HtFLlib's data set of uploaded prototypes, one ``(prototype, class)`` pair per
client and held class (:func:`prototype_pairs`), with HtFLlib's loop: plain SGD,
``server-epochs`` shuffled passes, mini-batches of :data:`SERVER_BATCH_SIZE`
(:func:`train_on_pairs`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.logger import log
from torch import nn

from common import protocol as P
from common.threads import one_thread

from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Dense, Expect, Reply
from .aggregate import class_mean
from .base import Algorithm, Params

#: Mini-batch size of the server-side training: HtFLlib's ``args.batch_size``
#: default (10), which HtFLlib's FedTGP and FedGH servers use.
SERVER_BATCH_SIZE = 10


class PrototypeWidthMismatch(ValueError):
    """Clients uploaded prototypes of different widths: the setting cannot work."""


@dataclass(frozen=True)
class ClientPrototypes:
    """One client's validated upload."""

    name: str
    protos: np.ndarray  # [C, D] float32; rows of absent classes are meaningless
    counts: np.ndarray  # [C] float32 >= 0; 0 = class absent


def prototypes_payload(protos: np.ndarray, present: np.ndarray) -> RecordDict:
    """``protos`` ``[C, D]`` and the present mask as 0/1 ``proto-counts`` ``[C]``."""
    mask = np.asarray(present, dtype=np.float32)
    return RecordDict(
        {
            P.ARRAYS: ArrayRecord(
                {
                    P.PROTOS: Array(np.ascontiguousarray(protos, dtype=np.float32)),
                    P.PROTO_COUNTS: Array(mask),
                }
            )
        }
    )


def prototype_pairs(
    uploads: list[ClientPrototypes],
) -> tuple[torch.Tensor, torch.Tensor]:
    """HtFLlib's server data set: ``([N, D] prototypes, [N] classes)``, one pair
    per client and class it holds, in client then class order."""
    rows, labels = [], []
    for upload in uploads:
        held = np.flatnonzero(upload.counts > 0)
        rows.append(upload.protos[held])
        labels.append(held)
    x = torch.from_numpy(np.concatenate(rows).astype(np.float32))
    y = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    return x, y


def round_generator(seed: int, server_round: int) -> torch.Generator:
    """Seeded generator for one round's server-side shuffling."""
    seq = np.random.SeedSequence([seed, server_round, 0x9407])
    return torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def train_on_pairs(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    generator: torch.Generator,
    batch_size: int = SERVER_BATCH_SIZE,
) -> float:
    """HtFLlib's server loop: ``epochs`` shuffled passes over ``(x, y)`` in
    mini-batches (the last one may be smaller), a fresh plain SGD optimizer
    (no momentum, no weight decay). Returns the mean loss of the last epoch."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    module.train()
    losses: list[float] = []
    with one_thread():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            losses = []
            for i in range(0, x.shape[0], batch_size):
                idx = order[i : i + batch_size]
                loss = loss_fn(module, x[idx], y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    module.eval()
    return float(np.mean(losses)) if losses else float("nan")


def seeded_module(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global RNG as
    it was (so the server's initialisation is reproducible and disturbs
    nothing)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class ServerTrainingParams(Params):
    """Training on the server (FedGH's head, FedTGP's generator)."""

    server_epochs: int
    server_lr: float


class PrototypeStrategy(Algorithm):
    """Base: reads and validates uploaded prototypes; sends global prototypes.

    Attributes
    ----------
    num_classes : int
        ``C``, the task's class count (the same for every client).
    feature_dim : int or None
        ``D``, learnt from the first valid upload; every later upload must match.
    global_protos, present : np.ndarray or None
        What :meth:`train_payload` sends: ``[C, D]`` and ``[C]`` bool.
    """

    checkpoint_attributes = ("feature_dim", "global_protos", "present")

    def __init__(self, params) -> None:
        super().__init__(params)
        self.num_classes = 0
        self.feature_dim: int | None = None
        self.global_protos: np.ndarray | None = None
        self.present: np.ndarray | None = None

    def setup(self, clients: ClientRegistry) -> None:
        classes = {c.num_classes for c in clients}
        if len(classes) != 1:
            raise ValueError(
                f"strategy '{self.name}': clients report different class counts "
                f"{sorted(classes)}; prototypes need one label space"
            )
        self.num_classes = classes.pop()

    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        if self.global_protos is None or self.present is None:
            return RecordDict()
        return prototypes_payload(self.global_protos, self.present)

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """``protos`` ``[C, D]`` and ``proto-counts`` ``[C]``, finite floats."""
        classes = self.num_classes
        return {P.PROTOS: Dense((classes, None)), P.PROTO_COUNTS: Dense((classes,))}

    def read_reply(self, client: ClientInfo, arrays: dict[str, Any]) -> dict[str, Any]:
        """Counts must be non-negative and hold at least one class."""
        counts = arrays[P.PROTO_COUNTS]
        if (counts < 0).any() or not (counts > 0).any():
            raise ValueError(
                f"'{P.PROTO_COUNTS}' {counts.tolist()}: negative or no class"
            )
        return arrays

    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        """Check the widths ``D`` agree, then :meth:`update`.

        A width other than the one learnt from the first upload raises
        :class:`PrototypeWidthMismatch`: prototypes of different feature spaces
        cannot be compared.
        """
        uploads = [
            ClientPrototypes(
                r.client.name, r.arrays[P.PROTOS], r.arrays[P.PROTO_COUNTS]
            )
            for r in replies
        ]
        if not uploads:
            log(WARNING, "round %d: no usable prototypes; %s state unchanged",
                server_round, self.name)  # fmt: skip
            return
        self.check_widths(uploads)
        self.update(server_round, uploads)

    @abstractmethod
    def update(self, server_round: int, uploads: list[ClientPrototypes]) -> None:
        """Update the server state from this round's validated uploads."""

    def check_widths(self, uploads: list[ClientPrototypes]) -> None:
        """Learn ``D`` from the first upload; raise if any other width appears."""
        if not uploads:
            return
        if self.feature_dim is None:
            self.feature_dim = int(uploads[0].protos.shape[1])
        widths = {u.name: int(u.protos.shape[1]) for u in uploads}
        if any(w != self.feature_dim for w in widths.values()):
            raise PrototypeWidthMismatch(
                f"strategy '{self.name}' compares class prototypes of all clients, "
                f"but their feature widths differ (expected {self.feature_dim}): "
                + ", ".join(f"{n}: {w}" for n, w in sorted(widths.items()))
                + ". Use models whose features have the same width (the paper's "
                "five models all end in a 64-wide feature layer)"
            )

    @staticmethod
    def mean_prototypes(
        uploads: list[ClientPrototypes],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per class, the unweighted mean over the clients that hold it
        (HtFLlib's ``proto_aggregation`` / ``proto_cluster``): ``[C, D]`` and
        the ``[C]`` present mask."""
        return class_mean([u.protos for u in uploads], [u.counts for u in uploads])
