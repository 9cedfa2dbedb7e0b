"""Client side of MH-pFedHNGD: the global model as a teacher (PAPER.md).

A train message carries the client's ``theta_i`` and the round-start global
vector ``g``. Phase A trains a copy of the global model (``global-model``) on the
local data with cross-entropy and yields ``delta_g = g - g_trained``. Phase B
trains the personal model with :func:`client_app.training.distillation_loss`,
the teacher being the round-start ``g`` (not the fine-tuned copy). Both deltas go
back (in the run-config ``transfer`` encoding); only the personal model is
ever evaluated.

The teacher normalises with the statistics of the batch it sees (BatchNorm in
training mode, as in the reference code, whose teacher is never switched to
evaluation mode): the server generates only the global model's parameters, so it
has no running statistics to evaluate with. Dropout is off in the teacher.

Deviation from the reference code: phase A clips its gradient norm at
``client-grad-clip`` like every local training here (the reference does not clip
phase A; at norm 50 the clip rarely acts).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from common import protocol as P
from common.flat import flatten_params, load_flat_
from common.models import build_model

from ..training import distillation_loss
from .base import register_trainer
from .delta import DeltaTrainer


def batch_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its BatchNorm layers normalising by batch statistics."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


@register_trainer("mh-pfedhngd")
class HypernetGDTrainer(DeltaTrainer):
    """Phase A on a copy of the global model, phase B distilled from it."""

    def global_model(self, vector: np.ndarray) -> torch.nn.Module:
        client = self.client
        data = client.data
        model = build_model(client.cfg.global_model, data.num_classes, data.in_channels)
        model = model.to(client.device, memory_format=torch.channels_last)
        load_flat_(model, vector)
        return model

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        cfg = self.client.cfg
        g = self.received(content, P.GLOBAL_THETA)

        # Phase A: fine-tune a copy of the global model with cross-entropy.
        student = self.global_model(g)
        global_stats = self.fit(student, server_round)
        delta_g = g - flatten_params(student).cpu().numpy()

        # Phase B: personal training distilled from the round-start global model.
        teacher = batch_statistics(self.global_model(g).eval())

        def loss_fn(model, xb, yb):
            with torch.no_grad():
                target = teacher(xb)
            return distillation_loss(
                model(xb), target, yb, cfg.gd_alpha, cfg.gd_temperature
            )

        delta, stats = self.train_received(content, server_round, loss_fn)
        metrics = self.train_metrics(stats, **{P.GLOBAL_LOSS: global_stats.loss})
        metrics[P.SECONDS] = stats.seconds + global_stats.seconds
        arrays = self.encode(P.DELTA, delta) | self.encode(P.GLOBAL_DELTA, delta_g)
        return self.reply(metrics, **arrays)
