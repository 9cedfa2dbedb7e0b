"""LG-FedAvg (Liang et al., 2020): local feature extractors, one averaged head.

Every client keeps its own model. Each round it replaces its classifier head
(``model.head``, ``Linear(64, classes)`` for the paper's five models) with the
global head, trains the whole model with cross-entropy, and uploads the trained
head; the server averages the heads by examples. Evaluation: the client's
extractor with the latest global head. Wire: the head (``head``, 650 values for
CIFAR-10) down and up.

As HtFLlib's ``LG-FedAvg``, except that round 1 sends no head (the server has
none yet; clients start from their own initial heads) where HtFLlib starts all
clients from the first client's head.
"""

from __future__ import annotations

from common import protocol as P

from . import register_strategy
from .averaging import AveragingStrategy


@register_strategy("lg-fedavg")
class LGFedAvg(AveragingStrategy):
    """Averaged classifier heads over private extractors."""

    down_key, up_key, up_is_delta, what = P.HEAD, P.HEAD, False, "head"
