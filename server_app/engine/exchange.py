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

:class:`InOrder` is the same flight in ordered mode: replies are handed out
strictly in message order, and the next message is built only after the caller
has processed the reply that frees its slot (sequential updates);
:func:`side_by_side` orders its clients so that the ones in flight together take
about as long.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.05


class Flight:
    """Messages pushed at most ``window`` at a time (``window = 0``: all at once).

    Unordered (default): the next message is built and pushed when a reply frees
    a slot (:meth:`accept`) or a message is given up after ``timeout`` seconds
    without a reply (:meth:`expire`); :attr:`replies` collects the replies.

    ``ordered``: a slot frees only when the reply at the head of the message
    order is handed out (:meth:`release`); an early reply waits for its
    predecessors, and only the head is given up on after ``timeout``, so a
    late reply behind a slow head is still used.

    ``messages`` may be a lazy iterable; it is consumed only as slots free up, so
    the caller must not change what it generates from in the meantime.

    ``hold``: a message for which it returns true is built but not pushed; the
    flight pushes nothing after it until a later :meth:`top_up` finds it free.
    """

    def __init__(
        self,
        grid: Grid,
        messages: Iterable[Message],
        window: int,
        timeout: float,
        ordered: bool = False,
        hold: Callable[[Message], bool] | None = None,
    ) -> None:
        self.grid, self.window, self.timeout = grid, window, timeout
        self.ordered, self.hold = ordered, hold
        self._source = iter(messages)
        self._exhausted = False
        self._held: Message | None = None
        # id -> (position, push time, destination node)
        self.sent: dict[str, tuple[int, float, int]] = {}
        self.replies: list[Message] = []
        self.given_up = 0
        self._pushed = 0  # messages taken from the source
        self._released = 0  # ordered: replies handed out
        self._arrived: dict[int, Message | None] = {}  # ordered: by position
        self.top_up()

    def top_up(self) -> None:
        """Push messages until ``window`` are in flight, none are left or the
        next one is held."""
        while not self._exhausted and self._has_room():
            message, self._held = self._held or next(self._source, None), None
            if message is None:
                self._exhausted = True
                break
            if self.hold is not None and self.hold(message):
                self._held = message
                break
            position, self._pushed = self._pushed, self._pushed + 1
            # A list: Flower's deployment grid iterates its argument twice.
            ids = list(self.grid.push_messages([message]))
            if not ids and self.ordered:  # the node is gone: nothing comes back
                self._arrived[position] = None
            for message_id in ids:
                node = message.metadata.dst_node_id
                self.sent[message_id] = (position, time.monotonic(), node)

    @property
    def waiting_nodes(self) -> set[int]:
        """Nodes with a message of this flight not yet answered or given up."""
        return {node for _, _, node in self.sent.values()}

    @property
    def holding(self) -> bool:
        """A built message waits for :attr:`hold` to let it go."""
        return self._held is not None

    def _has_room(self) -> bool:
        busy = self._pushed - self._released if self.ordered else len(self.sent)
        return self.window == 0 or busy < self.window

    @property
    def done(self) -> bool:
        """Every message was pushed and answered or given up (and, ordered,
        handed out)."""
        if self.ordered:
            return self._exhausted and self._released == self._pushed
        return self._exhausted and not self.sent

    def accept(self, reply: Message) -> bool:
        """Keep ``reply`` if it answers one of these messages (unordered: and
        refill the slot)."""
        entry = self.sent.pop(reply.metadata.reply_to_message_id, None)
        if entry is None:
            return False
        if self.ordered:
            self._arrived[entry[0]] = reply
        else:
            self.replies.append(reply)
            self.top_up()
        return True

    def expire(self) -> None:
        """Give up on messages unanswered ``timeout`` seconds after their push
        (ordered: only the head; ``None`` takes its place)."""
        now = time.monotonic()
        late = [
            m
            for m, (position, at, _) in self.sent.items()
            if now - at >= self.timeout
            and (not self.ordered or position == self._released)
        ]
        for message_id in late:
            position = self.sent.pop(message_id)[0]
            if self.ordered:
                self._arrived[position] = None
        self.given_up += len(late)
        if late and not self.ordered:
            self.top_up()

    def head(self) -> tuple[int, Message | None] | None:
        """Ordered: ``(position, reply or None)`` of the next reply in message
        order once it is in (or given up), else ``None``."""
        if self._released in self._arrived:
            return self._released, self._arrived[self._released]
        return None

    def release(self) -> None:
        """Ordered: the head was processed; free its slot and push the next."""
        del self._arrived[self._released]
        self._released += 1
        self.top_up()

    def restart_clock(self) -> None:
        """Count every pending message's ``timeout`` from now."""
        now = time.monotonic()
        self.sent = {m: (pos, now, node) for m, (pos, _, node) in self.sent.items()}


def _pull(grid: Grid, flights: list[Flight]) -> None:
    """One poll for the replies of every pending message of ``flights``."""
    pending = [m for flight in flights for m in flight.sent]
    for reply in grid.pull_messages(pending):
        any(flight.accept(reply) for flight in flights)


def _land(grid: Grid, flight: Flight, poll: float) -> None:
    """Poll until every message of an unordered ``flight`` is answered or given up."""
    while not flight.done:
        _pull(grid, [flight])
        flight.expire()
        if not flight.done:
            time.sleep(poll)


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
    _land(grid, flight, poll)
    return flight.replies


class InOrder:
    """Replies to ``messages`` handed out strictly in their order, at most
    ``window`` not yet handed out: iterate for ``(position, reply or None)``.

    Message ``k + window`` is built after the caller has processed reply ``k``
    (the loop resumes), so it can depend on that reply. ``None``: no reply
    within ``timeout`` seconds of the push. ``alongside`` messages (all pushed at
    once, right after the first ``window``) are polled in the same loop and get
    ``timeout`` more seconds once the ordered ones are done; their replies are in
    :attr:`alongside_replies` after the loop.

    An ordered message goes out only once its node has answered (or been given
    up on for) its alongside message: a node then handles the two in the order
    the server meant, and never both at once (a simulation runs a node's
    messages on whichever worker is free, each with its own copy of the node's
    state, so two at once would lose one's changes to that state).
    """

    def __init__(
        self,
        grid: Grid,
        messages: Iterable[Message],
        timeout: float,
        window: int,
        alongside: Iterable[Message] = (),
        poll: float = POLL_SECONDS,
    ) -> None:
        self.grid, self.poll = grid, poll
        self.along: Flight | None = None
        self.flight = Flight(
            grid, messages, window, timeout, ordered=True, hold=self._node_busy
        )
        self.along = Flight(grid, alongside, 0, timeout)
        self.alongside_replies: list[Message] = []

    def _node_busy(self, message: Message) -> bool:
        along = self.along
        return along is not None and message.metadata.dst_node_id in along.waiting_nodes

    def __iter__(self) -> Iterator[tuple[int, Message | None]]:
        flight, along = self.flight, self.along
        assert along is not None
        while not flight.done:
            head = flight.head()
            if head is None:
                _pull(self.grid, [flight, along])
                if flight.holding:
                    along.expire()
                    flight.top_up()
                if flight.head() is None:
                    flight.expire()
                if flight.head() is None:
                    time.sleep(self.poll)
                continue
            yield head
            flight.release()
        along.restart_clock()
        _land(self.grid, along, self.poll)
        self.alongside_replies = along.replies


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def side_by_side(
    order: list[str], size: Mapping[str, int], width: int, rng: np.random.Generator
) -> list[str]:
    """``order`` regrouped so that the clients in flight together have equal size.

    In an ordered flight of ``width`` slots a reply that arrives before its
    predecessor's waits, and so does the slot it would free: a small model that
    finishes beside a large one leaves its core idle. Sorting the clients by
    ``size`` (their trainable parameters; the seeded ``order`` breaks ties),
    cutting the sorted list into groups of ``width`` and visiting the groups in
    a seeded random order keeps clients of one architecture side by side.

    Returns ``order`` itself, drawing nothing from ``rng``, when every client
    has the same size or at most one client is in flight.
    """
    if width <= 1 or len({size[name] for name in order}) <= 1:
        return order
    ranked = sorted(order, key=size.__getitem__)
    groups = [ranked[i : i + width] for i in range(0, len(ranked), width)]
    return [name for g in rng.permutation(len(groups)) for name in groups[g]]


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
