"""Client side of ``fd`` (FedDistill, Jeong et al. 2018): per-class mean logits.

The train message carries the global per-class logits (:data:`~common.protocol.LOGITS`
``[C, C]``) and their counts (:data:`~common.protocol.PROTO_COUNTS` ``[C]``, 0: no
global logits for the class), nothing in round 1. The kept personal model trains
with ``CE + reg-lambda * regulariser`` (:func:`fd_regulariser`); meanwhile the
logits it produces on its training batches are summed per class, and their
means go back with the client's per-class example counts. Only the personal
model is evaluated. Every deviation from HtFLlib is in
:mod:`server_app.strategies.fd`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from common import protocol as P

from .base import PersonalTrainer, register_trainer


def fd_regulariser(
    logits: torch.Tensor,
    y: torch.Tensor,
    global_logits: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """``(1 / B) sum_{i: present[y_i]} CE(z_i, softmax(g_{y_i}))``, the soft-label
    cross-entropy ``-sum_c softmax(g_{y_i})_c log softmax(z_i)_c``.

    HtFLlib (``clientFD.train``) computes ``CE(z, softmax(z_hat))`` over the whole
    batch, ``z_hat`` being ``z.detach()`` with the rows of present classes
    replaced by their global logits: its other rows have zero gradient, and they
    are left out here, so the gradient is HtFLlib's and only the loss value
    lacks those rows' (constant) entropies.
    """
    keep = present[y].to(logits.dtype)
    target = F.softmax(global_logits[y].to(logits.dtype), dim=1)
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (per_row * keep).sum() / logits.shape[0]


@register_trainer("fd")
class FedDistillTrainer(PersonalTrainer):
    """Trains the personal model towards the global per-class logits."""

    def received_logits(
        self, content: RecordDict
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Global logits ``[C, C]`` and the present mask ``[C]``, or None."""
        arrays = content.array_records.get(P.ARRAYS)
        if arrays is None or P.LOGITS not in arrays:
            return None
        c = self.client.data.num_classes
        table = np.asarray(arrays[P.LOGITS].numpy(), np.float32)
        counts = np.asarray(arrays[P.PROTO_COUNTS].numpy())
        if table.shape != (c, c) or counts.shape != (c,):
            raise ValueError(
                f"received logits of shape {table.shape} and counts of shape "
                f"{counts.shape}; expected ({c}, {c}) and ({c},)"
            )
        device = self.client.device
        return torch.from_numpy(table).to(device), torch.from_numpy(counts > 0).to(
            device
        )

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        client = self.client
        c = client.data.num_classes
        received = self.received_logits(content)
        reg_lambda = client.cfg.reg_lambda
        sums = torch.zeros((c, c), dtype=torch.float64, device=client.device)
        rows = torch.zeros(c, dtype=torch.float64, device=client.device)

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
            logits = model(x)
            sums.index_add_(0, y, logits.detach().to(torch.float64))
            rows.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
            loss = F.cross_entropy(logits, y)
            if received is not None:
                loss = loss + reg_lambda * fd_regulariser(logits, y, *received)
            return loss

        stats = self.fit(client.model, server_round, loss_fn)
        held = rows > 0
        sums[held] /= rows[held, None]
        counts = torch.bincount(client.data.train_y, minlength=c)
        return self.reply(
            self.train_metrics(stats),
            **{
                P.LOGITS: sums.to(torch.float32).cpu().numpy(),
                P.PROTO_COUNTS: counts.to(torch.float32).cpu().numpy(),
            },
        )
