"""Client side of ``fedkd`` (FedKD, Wu et al. 2022): the kept personal model
(teacher, "mentor") and the shared student ("mentee", architecture
``global-model``) distil into each other, with an adaptive weight and a hidden-
representation term through a learnable projection ``W_h`` kept on the client.

The train message carries the student: dense (:data:`~common.protocol.SHARED`) in
round 1, SVD-compressed afterwards (:data:`~common.lowrank.FACTORS`,
:data:`~common.lowrank.RANKS`). The client rebuilds it, trains teacher, student
and ``W_h`` together on every mini-batch with :func:`fedkd_losses`, keeps
``W_h`` in its state (:data:`W_H_KEY`), and uploads the trained student
compressed with round ``r``'s energy (:func:`common.lowrank.energy_at`). Only
the personal model is ever evaluated. Losses, wire format and every deviation
from HtFLlib are in :mod:`server_app.strategies.fedkd`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from common import lowrank
from common import protocol as P
from common.flat import flatten_params, load_flat_

from .base import PersonalTrainer, register_trainer
from .fml import build_shared_model, kl_mean, mean_losses

#: Node-state key of the flat ``W_h`` (``[D_t, D_s]`` row-major).
W_H_KEY = "fedkd-w-h"


def features_and_logits(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [B, D], head(features))``; an error for feature maps."""
    feats = model.features(x)
    if feats.dim() != 2:
        raise ValueError(
            f"fedkd needs models whose features(x) is a [batch, features] vector; "
            f"{type(model).__name__} gives shape {tuple(feats.shape)}"
        )
    return feats, model.head(feats)


def fedkd_losses(
    teacher_rep: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_rep: torch.Tensor,
    student_logits: torch.Tensor,
    w_h: nn.Module,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedKD's teacher and student losses (HtFLlib's ``clientKD.train``)::

        S   = CE_t + CE_s
        L_t = CE_t + KL(p_s || p_t) / S + MSE(h_t, W_h h_s) / S
        L_s = CE_s + KL(p_t || p_s) / S + MSE(h_t, W_h h_s) / S

    ``p = softmax(logits)``, KL as :func:`~client_app.trainers.fml.kl_mean`
    (mean over ``B * C``), MSE the mean over ``B * D_t``. Nothing is detached,
    the denominator ``S`` included (as in HtFLlib).
    """
    ce_t = F.cross_entropy(teacher_logits, y)
    ce_s = F.cross_entropy(student_logits, y)
    scale = ce_t + ce_s
    hidden = F.mse_loss(teacher_rep, w_h(student_rep)) / scale
    l_t = ce_t + kl_mean(teacher_logits, student_logits) / scale + hidden
    l_s = ce_s + kl_mean(student_logits, teacher_logits) / scale + hidden
    return l_t, l_s


@register_trainer("fedkd")
class FedKDTrainer(PersonalTrainer):
    """Adaptive mutual distillation of the personal model and the student."""

    def received_student(self, content: RecordDict) -> nn.Module:
        """The student the server sent, dense or as SVD factors."""
        arrays = content[P.ARRAYS]
        student = build_shared_model(self.client)
        if P.SHARED in arrays:
            vector = arrays[P.SHARED].numpy()
        else:
            vector = lowrank.decompress(
                arrays[lowrank.FACTORS].numpy(),
                arrays[lowrank.RANKS].numpy(),
                lowrank.param_shapes(student),
            )
        load_flat_(student, vector)
        return student

    def projection(self, teacher: nn.Module, student: nn.Module, round_: int):
        """``W_h: Linear(D_s, D_t, bias=False)``, kept from earlier rounds or,
        the first time, PyTorch's default initialisation (seeded)."""
        x = self.client.train_tensors()[0][:1]
        with torch.no_grad():
            d_t = features_and_logits(teacher.eval(), x)[0].shape[1]
            d_s = features_and_logits(student.eval(), x)[0].shape[1]
        self.client.generator(round_)  # seeds torch for the first initialisation
        w_h = nn.Linear(d_s, d_t, bias=False)
        kept = self.kept_array(W_H_KEY)
        if kept is not None and kept.size == d_s * d_t:
            load_flat_(w_h, kept)
        return w_h.to(self.client.device)

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        cfg = self.client.cfg
        teacher = self.client.model
        student = self.received_student(content)
        w_h = self.projection(teacher, student, server_round)
        trio = nn.ModuleDict({"teacher": teacher, "student": student, "w_h": w_h})
        losses: list[torch.Tensor] = []

        def loss_fn(models: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor):
            h_t, z_t = features_and_logits(models["teacher"], x)
            h_s, z_s = features_and_logits(models["student"], x)
            l_t, l_s = fedkd_losses(h_t, z_t, h_s, z_s, models["w_h"], y)
            losses.append(torch.stack([l_t, l_s]).detach())
            # One backward of the sum = HtFLlib's two accumulated backward passes.
            return l_t + l_s

        stats = self.fit(trio, server_round, loss_fn)
        self.keep_array(W_H_KEY, flatten_params(w_h))
        teacher_loss, student_loss = mean_losses(losses, 2)
        energy = lowrank.energy_at(
            server_round,
            cfg.num_server_rounds,
            cfg.fedkd_energy_start,
            cfg.fedkd_energy_end,
        )
        factors, ranks = lowrank.compress(
            flatten_params(student).cpu().numpy(),
            lowrank.param_shapes(student),
            energy,
        )
        metrics = self.train_metrics(stats, **{P.GLOBAL_LOSS: student_loss})
        metrics[P.LOSS] = teacher_loss
        return self.reply(
            metrics,
            **{lowrank.FACTORS: factors, lowrank.RANKS: np.asarray(ranks, np.int32)},
        )
