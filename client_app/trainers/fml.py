"""Client side of ``fml`` (FML, Shen et al. 2020): the personal model and the
shared "meme" model learn from each other (deep mutual learning).

The train message carries the meme's flat parameters (:data:`~common.protocol.SHARED`,
architecture ``global-model``). The client loads them into a fresh
``global-model``, trains it together with its kept personal model on every
mini-batch, and uploads the trained meme (:data:`~common.protocol.SHARED`).
Only the personal model is ever evaluated. The losses and every deviation from
HtFLlib are in :mod:`server_app.strategies.fml`; :func:`fml_losses` is the math.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from common import protocol as P
from common.flat import flatten_params, load_flat_
from common.models import build_model

from ..local import LocalClient
from .base import PersonalTrainer, register_trainer


def build_shared_model(client: LocalClient, vector: np.ndarray | None = None):
    """A ``global-model`` for this client's task on its device (channels-last),
    holding ``vector`` when given."""
    data = client.data
    model = build_model(client.cfg.global_model, data.num_classes, data.in_channels)
    model = model.to(client.device, memory_format=torch.channels_last)
    if vector is not None:
        load_flat_(model, vector)
    return model


def kl_mean(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` summed over classes and divided
    by ``B * C``: HtFLlib's ``nn.KLDivLoss()(log_softmax(logits),
    softmax(target))`` (reduction ``'mean'``, temperature 1). Nothing detached."""
    kl = F.kl_div(
        F.log_softmax(logits, dim=1),
        F.log_softmax(target_logits, dim=1),
        reduction="sum",
        log_target=True,
    )
    return kl / logits.numel()


def fml_losses(
    personal_logits: torch.Tensor,
    shared_logits: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FML's two losses (HtFLlib's ``clientFML.train``)::

        L_p = alpha CE(z_p, y) + (1 - alpha) KL(softmax(z_s) || softmax(z_p))
        L_s = beta  CE(z_s, y) + (1 - beta)  KL(softmax(z_p) || softmax(z_s))

    with :func:`kl_mean` as KL. Neither target is detached (as in HtFLlib).
    """
    l_p = alpha * F.cross_entropy(personal_logits, y) + (1 - alpha) * kl_mean(
        personal_logits, shared_logits
    )
    l_s = beta * F.cross_entropy(shared_logits, y) + (1 - beta) * kl_mean(
        shared_logits, personal_logits
    )
    return l_p, l_s


def mean_losses(losses: list[torch.Tensor], count: int) -> list[float]:
    """Per-model means of the stacked per-batch losses (zeros without batches)."""
    if not losses:
        return [0.0] * count
    return torch.stack(losses).mean(dim=0).tolist()


@register_trainer("fml")
class FMLTrainer(PersonalTrainer):
    """Mutual learning of the kept personal model and the received meme."""

    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        cfg = self.client.cfg
        shared = build_shared_model(self.client, content[P.ARRAYS][P.SHARED].numpy())
        pair = nn.ModuleDict({"personal": self.client.model, "shared": shared})
        losses: list[torch.Tensor] = []

        def loss_fn(models: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor):
            l_p, l_s = fml_losses(
                models["personal"](x), models["shared"](x), y, cfg.fml_alpha,
                cfg.fml_beta,
            )  # fmt: skip
            losses.append(torch.stack([l_p, l_s]).detach())
            # One backward of the sum = HtFLlib's two accumulated backward passes.
            return l_p + l_s

        stats = self.fit(pair, server_round, loss_fn)
        personal_loss, shared_loss = mean_losses(losses, 2)
        metrics = self.train_metrics(stats, **{P.GLOBAL_LOSS: shared_loss})
        metrics[P.LOSS] = personal_loss
        return self.reply(metrics, **{P.SHARED: flatten_params(shared).cpu().numpy()})
