"""Client-side class prototypes, shared by ``fedproto``, ``fedtgp`` and ``fedgh``.

Notation: ``f(x) = model.features(x)`` is the ``D``-wide penultimate
representation (``D = 64`` for the paper's five models), ``C`` the number of
classes, ``p_c`` the global prototype of class ``c`` (sent by the server) and
``present[c]`` whether the server has one for ``c``.

- :func:`local_prototypes`: the client's prototypes, per class the mean feature
  over its train split, ``proto_c = (1 / n_c) sum_{i: y_i = c} f(x_i)``, computed
  in eval mode without gradients, with the counts ``n_c`` (0: class absent);
- :func:`prototype_regulariser`: FedProto's term (HtFLlib's
  ``MSELoss(proto_new, rep)``), ``(1 / (B D)) sum_{i: present[y_i]}
  ||f(x_i) - p_{y_i}||^2`` over a batch of ``B``: samples whose class has no
  global prototype add zero but still count in the ``B D`` of the mean;
- :func:`prototype_loss`: ``CE(head(f(x)), y) + lambda * regulariser``;
- :func:`nearest_prototype_logits`: class scores ``-||f(x) - p_c||^2`` (argmax =
  nearest global prototype), and ``-ABSENT_DISTANCE`` for classes without one.

On the wire (``arrays`` record): :data:`~common.protocol.PROTOS` ``[C, D]``
float32 and :data:`~common.protocol.PROTO_COUNTS` ``[C]`` float32, up as the
example counts, down as the 0/1 present mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from common import protocol as P

from .training import LogitsFn, LossFn

#: Squared distance given to classes without a global prototype: never nearest,
#: and the evaluation loss (cross-entropy of the scores) stays finite.
ABSENT_DISTANCE = 1e9


def features_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.features(x)`` as ``[B, D]``; a clear error for other shapes.

    Prototype strategies need a feature *vector* that ``model.head`` maps to the
    logits (every model but SqueezeNet, whose features are a map).
    """
    feats = model.features(x)
    if feats.dim() != 2:
        raise ValueError(
            f"prototype strategies need models whose features(x) is a [batch, "
            f"features] vector; {type(model).__name__} gives shape "
            f"{tuple(feats.shape)}"
        )
    return feats


@torch.no_grad()
def local_prototypes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean features of ``(x, y)`` in eval mode, and the class counts.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``[C, D]`` float32 means (zero rows for absent classes) and ``[C]``
        float32 counts ``n_c``.
    """
    model.eval()
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], batch_size):
        feats = features_of(model, x[i : i + batch_size]).to(torch.float64)
        labels = y[i : i + batch_size]
        if sums is None:
            shape = (num_classes, feats.shape[1])
            sums = torch.zeros(shape, dtype=torch.float64, device=x.device)
        sums.index_add_(0, labels, feats)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    if sums is None:
        raise ValueError("local_prototypes of an empty train split")
    held = counts > 0
    sums[held] /= counts[held, None]
    return (
        sums.to(torch.float32).cpu().numpy(),
        counts.to(torch.float32).cpu().numpy(),
    )


def received_prototypes(
    content: RecordDict, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The global prototypes ``[C, D]`` and present mask ``[C]`` (bool) the
    server sent, or ``None`` when it sent none or none is present."""
    arrays = content.array_records.get(P.ARRAYS)
    if arrays is None or P.PROTOS not in arrays:
        return None
    protos = torch.from_numpy(np.array(arrays[P.PROTOS].numpy(), np.float32))
    present = torch.from_numpy(np.asarray(arrays[P.PROTO_COUNTS].numpy()) > 0)
    if protos.dim() != 2 or present.shape != protos.shape[:1]:
        raise ValueError(
            f"received prototypes of shape {tuple(protos.shape)} with a present "
            f"mask of shape {tuple(present.shape)}"
        )
    if not bool(present.any()):
        return None
    return protos.to(device), present.to(device)


def prototype_regulariser(
    feats: torch.Tensor,
    y: torch.Tensor,
    protos: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """``(1 / (B D)) sum_{i: present[y_i]} ||f_i - p_{y_i}||^2`` (see module doc).

    Equal to HtFLlib's ``MSELoss()(proto_new, rep)``, where ``proto_new`` is
    ``rep.detach()`` with the rows of present classes replaced by their global
    prototypes. Gradients flow into ``feats`` only.
    """
    keep = present[y].to(feats.dtype)[:, None]
    diff = (feats - protos[y].to(feats.dtype)) * keep
    return diff.pow(2).sum() / feats.numel()


def prototype_loss(
    protos: torch.Tensor | None, present: torch.Tensor | None, reg_lambda: float
) -> LossFn:
    """FedProto's local loss ``CE(head(f(x)), y) + lambda * regulariser``.

    Plain cross-entropy while there are no global prototypes (``protos`` None).
    """

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats = features_of(model, x)
        loss = F.cross_entropy(model.head(feats), y)
        if protos is not None and present is not None:
            loss = loss + reg_lambda * prototype_regulariser(feats, y, protos, present)
        return loss

    return loss_fn


def squared_distances(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` matrix of ``||f_i - p_c||^2``."""
    return (feats[:, None, :] - protos[None, :, :].to(feats.dtype)).pow(2).sum(dim=2)


def nearest_prototype_logits(protos: torch.Tensor, present: torch.Tensor) -> LogitsFn:
    """Scores ``-||f(x) - p_c||^2``; ``-ABSENT_DISTANCE`` for absent classes.

    Argmax = the nearest global prototype (HtFLlib's ``argmin`` of the MSE, which
    is the squared distance divided by ``D``).
    """

    def logits_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dist = squared_distances(features_of(model, x), protos)
        return -dist.masked_fill(~present[None, :], ABSENT_DISTANCE)

    return logits_fn
