"""A Grid that delivers messages to the real ClientApp inside the test process.

Only the transport is replaced: messages, replies (including Flower-style error
replies for exceptions), node contexts and their persistent ``state`` are real, so
a strategy and the ClientApp run their actual code in milliseconds and
deterministically. The end-to-end tests use real `flwr run` processes instead.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as default_app


class InProcessGrid(Grid):
    """``num_nodes`` simulated nodes with partition ids 0..num_nodes-1."""

    def __init__(
        self,
        run_config: dict,
        num_nodes: int,
        app: ClientApp = default_app,
        node_configs: dict[int, dict] | None = None,
        run_id: int = 1,
    ) -> None:
        # Messages read their run and node from the process's task identity, which
        # the Flower runtime sets; here the "server" is node 0 of run ``run_id``.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.app = app
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = 1000 + pid
            node_config = {"partition-id": pid, "num-partitions": num_nodes}
            node_config |= (node_configs or {}).get(pid, {})
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.answered: list[Message] = []

    # Grid API --------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated API
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(message)
            context = self.contexts.get(message.metadata.dst_node_id)
            if context is None:
                continue  # a node that left: no reply, as in a real federation
            try:
                reply = self.app(message, context)
            except Exception:  # noqa: BLE001 - becomes an error reply, like Flower
                reply = Message(
                    Error(code=0, reason=traceback.format_exc()), reply_to=message
                )
            self.replies[message_id] = reply
            self.answered.append(reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        return self.pull_messages(self.push_messages(messages))
