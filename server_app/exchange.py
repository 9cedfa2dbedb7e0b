"""Sending a round's messages and collecting the replies.

:func:`exchange` replaces ``Grid.send_and_receive`` for three reasons measured on
this app: it pushes each message as soon as it is built, so clients start
training while the server is still generating the other clients' models; it
polls for replies every ``poll`` seconds, where a deployed SuperLink's grid polls
every 3 s (about 1.5 s lost per message round on average); and it keeps at most
``window`` messages in flight (:class:`Flight`). Pushed messages wait in the
SuperLink until their node takes them; in simulation that store is scanned once
per node per pass, so all-at-once evaluation of 1000 CNN clients held 0.94 GB
there and spent more CPU in that scan than the clients spent evaluating
(docs/BENCHMARKS.md, ``bench.scale``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.05


class Flight:
    """Messages pushed at most ``window`` at a time (``window = 0``: all at once).

    The next message is built and pushed when a reply frees a slot
    (:meth:`accept`) or a message is given up after ``timeout`` seconds without
    a reply (:meth:`expire`). ``messages`` may be a lazy iterable; it is
    consumed only as slots free up, so the caller must not change what it
    generates from in the meantime.
    """

    def __init__(
        self, grid: Grid, messages: Iterable[Message], window: int, timeout: float
    ) -> None:
        self.grid, self.window, self.timeout = grid, window, timeout
        self._source = iter(messages)
        self._exhausted = False
        self.sent: dict[str, float] = {}  # message id -> monotonic push time
        self.replies: list[Message] = []
        self.given_up = 0
        self.top_up()

    def top_up(self) -> None:
        """Push messages until ``window`` are in flight or none are left."""
        while not self._exhausted and self._has_room():
            message = next(self._source, None)
            if message is None:
                self._exhausted = True
                break
            # A list: Flower's deployment grid iterates its argument twice.
            for message_id in self.grid.push_messages([message]):
                self.sent[message_id] = time.monotonic()

    def _has_room(self) -> bool:
        return self.window == 0 or len(self.sent) < self.window

    @property
    def done(self) -> bool:
        """Every message was pushed and answered or given up."""
        return self._exhausted and not self.sent

    def accept(self, reply: Message) -> bool:
        """Keep ``reply`` if it answers one of these messages and refill the slot."""
        if self.sent.pop(reply.metadata.reply_to_message_id, None) is None:
            return False
        self.replies.append(reply)
        self.top_up()
        return True

    def expire(self) -> None:
        """Give up on messages unanswered ``timeout`` seconds after their push."""
        now = time.monotonic()
        late = [m for m, at in self.sent.items() if now - at >= self.timeout]
        for message_id in late:
            del self.sent[message_id]
        self.given_up += len(late)
        if late:
            self.top_up()


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    window: int = 0,
    poll: float = POLL_SECONDS,
) -> list[Message]:
    """Push ``messages`` (at most ``window`` in flight; 0 = all at once) and
    return the replies that came in time.

    A message unanswered ``timeout`` seconds after its push is given up on (the
    caller sees fewer replies than messages).
    """
    flight = Flight(grid, messages, window, timeout)
    while not flight.done:
        for reply in grid.pull_messages(list(flight.sent)):
            flight.accept(reply)
        flight.expire()
        if not flight.done:
            time.sleep(poll)
    return flight.replies


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def error_text(reply: Message) -> str:
    """The exception a client raised, from its error reply.

    Flower puts the whole traceback in the reason; this keeps the final
    exception with its (possibly multi-line) message.
    """
    reason = (reply.error.reason or f"error code {reply.error.code}").strip()
    lines = reason.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[i]):
            return "\n".join(lines[i:]).strip()
    return lines[-1] if lines else reason
