"""The ClientApp: answers the handshake (QUERY), TRAIN and EVALUATE messages.

Every handler validates the run config, resolves this client's identity, model and
data (:class:`client_app.local.LocalClient`), and delegates the strategy-specific
work to the trainer registered for ``strategy``. An exception becomes Flower's
error reply, which the server reports with the client's name.

With node config ``state-dir`` (or run-config ``client-state-dir``), the client's
kept state also lives on disk (:mod:`client_app.persist`): restored into an empty
``context.state`` (a restarted SuperNode, a resumed run) before the client is
built, written after every TRAIN.

Run-config ``client-threads`` (when not 0) sets torch's intra-op threads for the
whole handling of a message, restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol as P
from common.allocator import keep_freed_memory
from common.config import RunConfig, load_run_config
from common.threads import intra_op_threads

from . import persist
from .local import LocalClient, client_name
from .trainers import ClientTrainer, build_trainer

# Every process that runs the app reuses freed memory (see common.allocator).
keep_freed_memory()
app = ClientApp()


@contextmanager
def _trainer(context: Context, message: Message) -> Iterator[ClientTrainer]:
    """This client (identity, model, data, kept state) and its strategy's trainer,
    built and used on run-config ``client-threads`` intra-op threads."""
    cfg = load_run_config(context.run_config)
    with intra_op_threads(cfg.client_threads):
        persist.restore(context, _state_files(context, cfg, message))
        client = LocalClient.from_context(context, cfg)
        yield build_trainer(cfg.strategy, client, context.state)


def _state_files(
    context: Context, cfg: RunConfig, message: Message
) -> persist.StateFiles | None:
    config = message.content.config_records.get(P.CONFIG, ConfigRecord())
    return persist.StateFiles.of(context, cfg, client_name(context), config)


def _round(message: Message) -> int:
    return int(message.content[P.CONFIG][P.ROUND])


def _answer(message: Message, content: RecordDict, cpu_start: float) -> Message:
    """The reply, its metrics stamped with the CPU time spent on the message
    since ``cpu_start`` (:data:`~common.protocol.MESSAGE_CPU_SECONDS`)."""
    content[P.METRICS][P.MESSAGE_CPU_SECONDS] = time.process_time() - cpu_start
    return Message(content=content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Handshake: name, parameter count, example counts, the task's class and
    channel counts and whether the client joins after training; nothing about
    its architecture."""
    with _trainer(context, message) as trainer:
        client = trainer.client
        content = trainer.reply(
            {
                P.NUM_PARAMS: client.num_params,
                P.NUM_TRAIN: client.data.num_train,
                P.NUM_TEST: client.data.num_test,
                P.NUM_CLASSES: client.data.num_classes,
                P.IN_CHANNELS: client.data.in_channels,
                P.NOVEL: int(client.novel),
            }
        )
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training on the model the server sent; reply with the update.

    With ``evaluate-first`` in the config the received model is evaluated before
    training (the previous round's evaluation, carried by this message).
    """
    cpu_start = time.process_time()
    with _trainer(context, message) as trainer:
        client = trainer.client
        evaluation = None
        if message.content[P.CONFIG].get(P.EVALUATE_FIRST, False):
            evaluation = MetricRecord(trainer.evaluate_metrics(message.content))
        content: RecordDict = trainer.train(message.content, _round(message))
        if evaluation is not None:
            content[P.EVAL_METRICS] = evaluation
        trainer.save()
        files = _state_files(context, client.cfg, message)
        persist.save(context, files, _round(message))
    return _answer(message, content, cpu_start)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Loss and accuracy of the model the server sent on the local test split."""
    cpu_start = time.process_time()
    with _trainer(context, message) as trainer:
        content = trainer.evaluate(message.content, _round(message))
    return _answer(message, content, cpu_start)
