"""Client side of a strategy: what a TRAIN or EVALUATE message makes a client do.

Each strategy that trains differently on the client has one trainer module,
registered under the strategy's name, so the ClientApp stays strategy-agnostic.
The shared loops live in :mod:`client_app.training`.

Two kinds of trainer share this base:

- the server sends the model (``theta``) every time (MH-pFedHN, FedAvg, pFedHN):
  :meth:`ClientTrainer.load_received` loads it before training or evaluation;
- the client keeps its personal model between messages (``keeps_model``: Local,
  LG-FedAvg, FedProto, ...): its trainable parameters live in the node's
  ``context.state`` next to the BatchNorm statistics, and what the server sends
  (a head, prototypes, a shared model) only adds to it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from common import protocol as P
from common.flat import buffer_state, flatten_params, load_buffer_state_, load_flat_
from common.transfer import decode_dense

from ..local import LocalClient
from ..training import (
    LogitsFn,
    LossFn,
    TrainStats,
    cross_entropy_loss,
    evaluate_local,
    has_batchnorm,
    recalibrate_batchnorm,
    train_local,
)

#: ``context.state`` record holding a ``keeps_model`` trainer's personal model.
PARAMS_KEY = "model-params"


class ClientTrainer(ABC):
    """Handles the TRAIN and EVALUATE messages of one strategy on one client.

    Parameters
    ----------
    client : LocalClient
        Identity, model and data of this client.
    state : RecordDict
        The node's ``context.state``: persists across messages and rounds.
    """

    #: Whether the personal model's parameters persist in ``state`` between
    #: messages (otherwise the server sends them every time).
    keeps_model: ClassVar[bool] = False

    def __init__(self, client: LocalClient, state: RecordDict | None = None) -> None:
        self.client = client
        self.state = state if state is not None else RecordDict()
        #: CPU seconds of this message's training loops (:meth:`fit`), sent as
        #: ``cpu-seconds`` with the reply; ``None`` until a loop ran.
        self.fit_cpu_seconds: float | None = None
        if self.keeps_model and PARAMS_KEY in self.state:
            load_flat_(client.model, self.state[PARAMS_KEY][P.THETA].numpy())

    # -- what a strategy implements ---------------------------------------------------
    @abstractmethod
    def train(self, content: RecordDict, server_round: int) -> RecordDict:
        """Train on the local split and return the reply content."""

    def load_received(self, content: RecordDict) -> None:
        """Put what the server sent into the personal model before use.

        Default: the full model ``theta``, when the message carries one.
        """
        arrays = content.array_records.get(P.ARRAYS)
        if arrays is not None and P.THETA in arrays:
            load_flat_(self.client.model, self.received(content, P.THETA))

    @staticmethod
    def received(content: RecordDict, key: str) -> np.ndarray:
        """Flat vector ``key`` of a message as float32, whatever floating dtype
        run-config ``transfer`` sent it in (:func:`common.transfer.decode_dense`)."""
        return decode_dense(content[P.ARRAYS][key].numpy())

    def logits_fn(self, content: RecordDict) -> LogitsFn | None:
        """How evaluation turns inputs into class scores (default: the model)."""
        return None

    # -- shared helpers ----------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        server_round: int,
        loss_fn: LossFn = cross_entropy_loss,
        params: list[nn.Parameter] | None = None,
    ) -> TrainStats:
        """Train ``model`` on the local split with the run's local hyperparameters.

        ``params`` restricts the optimised parameters (default: all of
        ``model``'s trainable ones).
        """
        client = self.client
        x, y = client.train_tensors()
        cpu = time.process_time()
        stats = train_local(
            model,
            x,
            y,
            client.hparams,
            client.generator(server_round),
            loss_fn,
            params=params,
        )
        cpu = time.process_time() - cpu
        self.fit_cpu_seconds = (self.fit_cpu_seconds or 0.0) + cpu
        return stats

    @staticmethod
    def train_metrics(stats: TrainStats, **extra: float) -> dict[str, float | int]:
        """The metrics every train reply carries, plus strategy extras."""
        return {
            P.NUM_EXAMPLES: stats.num_examples,
            P.LOSS: stats.loss,
            P.SECONDS: stats.seconds,
            **extra,
        }

    def evaluate_metrics(self, content: RecordDict) -> dict[str, float | int]:
        """Loss and accuracy counts of the personal model on the test split, and
        the wall-clock and CPU seconds of the evaluation loop (as a train reply
        reports its training loop's).

        With run-config ``bn-eval = "recalibrate"`` the BatchNorm statistics are
        first recomputed for the evaluated weights on the train split
        (:func:`~client_app.training.recalibrate_batchnorm`, counted in these
        seconds) and the stored ones put back afterwards; with ``both`` (and a
        model with BatchNorm) that reading is added as ``correct-recalibrated``.
        """
        self.load_received(content)
        model = self.client.model
        x, y = self.client.test_tensors()
        logits_fn = self.logits_fn(content)
        start, cpu = time.perf_counter(), time.process_time()
        mode = self.client.cfg.bn_eval
        if mode == "recalibrate":
            loss, correct, n = self.evaluate_recalibrated(model, x, y, logits_fn)
        else:
            loss, correct, n = evaluate_local(model, x, y, logits_fn=logits_fn)
        extra = {}
        if mode == "both" and has_batchnorm(model):
            _, extra[P.CORRECT_RECALIBRATED], _ = self.evaluate_recalibrated(
                model, x, y, logits_fn
            )
        return {
            P.NUM_EXAMPLES: n,
            P.CORRECT: correct,
            P.LOSS: loss,
            P.SECONDS: time.perf_counter() - start,
            P.CPU_SECONDS: time.process_time() - cpu,
            **extra,
        }

    def evaluate_recalibrated(self, model, x, y, logits_fn):
        """:func:`evaluate_local` with BatchNorm statistics recomputed for the
        evaluated weights; the stored ones are put back afterwards (evaluation
        never changes what training continues from)."""
        stored = buffer_state(model)
        recalibrate_batchnorm(model, self.client.train_tensors()[0])
        try:
            return evaluate_local(model, x, y, logits_fn=logits_fn)
        finally:
            if stored:
                load_buffer_state_(model, stored)

    def evaluate(self, content: RecordDict, server_round: int) -> RecordDict:
        """Reply to an EVALUATE message."""
        return self.reply(self.evaluate_metrics(content))

    def reply(
        self, metrics: dict[str, float | int], **arrays: np.ndarray
    ) -> RecordDict:
        """Reply content: the client's name, its metrics and named arrays.

        After training, the metrics also get the loops' ``cpu-seconds``.
        """
        if self.fit_cpu_seconds is not None and P.CPU_SECONDS not in metrics:
            metrics = {**metrics, P.CPU_SECONDS: self.fit_cpu_seconds}
        content = RecordDict(
            {
                P.INFO: ConfigRecord({P.CLIENT_NAME: self.client.name}),
                P.METRICS: MetricRecord(metrics),
            }
        )
        if arrays:
            content[P.ARRAYS] = ArrayRecord(
                {
                    key: Array(np.ascontiguousarray(value))
                    for key, value in arrays.items()
                }
            )
        return content

    def save(self) -> None:
        """Keep the client's state for the next message (after training)."""
        self.client.save_buffers(self.state)
        if self.keeps_model:
            vector = flatten_params(self.client.model).cpu().numpy()
            self.state[PARAMS_KEY] = ArrayRecord({P.THETA: Array(vector)})

    def keep_array(self, key: str, value: np.ndarray | torch.Tensor) -> None:
        """Keep one extra array in the node's state under ``key``."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        self.state[key] = ArrayRecord({key: Array(np.ascontiguousarray(value))})

    def kept_array(self, key: str) -> np.ndarray | None:
        """An array kept with :meth:`keep_array`, or ``None``."""
        if key not in self.state:
            return None
        return self.state[key][key].numpy()


class PersonalTrainer(ClientTrainer):
    """Base of trainers whose personal model stays on the client."""

    keeps_model = True

    def load_received(self, content: RecordDict) -> None:
        """Nothing by default: the personal model is the client's own."""

    def load_head(self, content: RecordDict) -> None:
        """Replace ``model.head`` by the flat ``head`` the server sent, if any."""
        arrays = content.array_records.get(P.ARRAYS)
        if arrays is not None and P.HEAD in arrays:
            load_flat_(self.client.model.head, arrays[P.HEAD].numpy())


TRAINERS: dict[str, type[ClientTrainer]] = {}


def register_trainer(
    *names: str,
) -> Callable[[type[ClientTrainer]], type[ClientTrainer]]:
    """Class decorator: make a trainer handle the strategies called ``names``."""

    def decorator(cls: type[ClientTrainer]) -> type[ClientTrainer]:
        for name in names:
            if name in TRAINERS:
                raise ValueError(f"trainer for '{name}' is registered twice")
            TRAINERS[name] = cls
        return cls

    return decorator


def build_trainer(
    strategy: str, client: LocalClient, state: RecordDict | None = None
) -> ClientTrainer:
    """The trainer registered for ``strategy``."""
    if strategy not in TRAINERS:
        raise ValueError(
            f"no client trainer for strategy '{strategy}'; "
            f"known: {', '.join(sorted(TRAINERS))}"
        )
    return TRAINERS[strategy](client, state)
