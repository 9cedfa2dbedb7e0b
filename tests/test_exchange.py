"""The bounded message window of ``server_app.engine.exchange`` (``max-in-flight``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from server_app.engine.exchange import Flight, InOrder, exchange, side_by_side
from tests.helpers import base_config, run, write_learnable_imagefolder
from tests.inprocess_grid import InProcessGrid


class SlowGrid(InProcessGrid):
    """Nodes that answer ``latency`` pulls after a message was pushed.

    Node ids in ``silent`` never answer. Records how many messages were in
    flight (pushed, reply not yet pulled) at most.
    """

    def __init__(self, num_nodes: int, latency: int = 2, silent=()) -> None:
        super().__init__({}, num_nodes)
        self.latency, self.silent = latency, set(silent)
        self.waiting: dict[str, list] = {}  # message id -> [pulls left, reply]
        self.in_flight = self.most_in_flight = 0
        self.pushed_before_first_pull: int | None = None

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            ids.append(message_id)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if message.metadata.dst_node_id not in self.silent:
                reply = Message(RecordDict({"echo": ConfigRecord({"n": 1})}),
                                reply_to=message)  # fmt: skip
                self.waiting[message_id] = [self.latency, reply]
        return ids

    def pull_messages(self, message_ids):
        if self.pushed_before_first_pull is None:
            self.pushed_before_first_pull = len(self.sent)
        out = []
        for message_id in message_ids:
            entry = self.waiting.get(message_id)
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                out.append(self.waiting.pop(message_id)[1])
                self.in_flight -= 1
        return out


def messages(
    grid: InProcessGrid, nodes, generated: list | None = None, kind=MessageType.QUERY
):
    """Lazily built messages; ``generated`` counts how many were built."""
    for node in nodes:
        if generated is not None:
            generated.append(node)
        yield Message(RecordDict(), dst_node_id=node, message_type=kind)


@pytest.mark.parametrize("window", [1, 3, 0])
def test_window_bounds_messages_in_flight(window):
    grid = SlowGrid(8)
    replies = exchange(grid, messages(grid, range(1000, 1008)), 60.0, window, poll=0)
    assert len(replies) == 8
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in grid.sent
    )
    assert grid.most_in_flight == (window or 8)
    assert grid.pushed_before_first_pull == (window or 8)


def test_messages_are_built_only_when_a_slot_frees():
    grid, generated = SlowGrid(6), []
    flight = Flight(grid, messages(grid, range(1000, 1006), generated), 2, 60.0)
    assert len(generated) == 2 and not flight.done
    reply = grid.pull_messages(list(flight.sent)) or grid.pull_messages(
        list(flight.sent)
    )
    assert flight.accept(reply[0]) and len(generated) == 3
    stranger = Message(RecordDict(), dst_node_id=1000, message_type=MessageType.QUERY)
    stranger.metadata.__dict__["_message_id"] = "not-ours"
    # a reply to someone else's message is ignored
    assert not flight.accept(Message(RecordDict(), reply_to=stranger))
    assert len(generated) == 3


class SlowEvaluations(SlowGrid):
    """EVALUATE replies take 6 pulls, others 1; logs pushes and pulled replies."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes, latency=1)
        self.events: list[tuple[str, int, str]] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids, strict=True):
            kind, node = message.metadata.message_type, message.metadata.dst_node_id
            self.events.append(("push", node, kind))
            if kind == MessageType.EVALUATE:
                self.waiting[message_id][0] = 6
        return ids

    def pull_messages(self, message_ids):
        sent = {m.metadata.message_id: m for m in self.sent}
        replies = super().pull_messages(message_ids)
        for reply in replies:
            message = sent[reply.metadata.reply_to_message_id]
            kind, node = message.metadata.message_type, message.metadata.dst_node_id
            self.events.append(("reply", node, kind))
        return replies


def test_an_ordered_message_waits_for_its_nodes_alongside_reply():
    """A node gets its next ordered message only after answering the alongside
    one (and never has both at once); other nodes' messages are not held up."""
    grid = SlowEvaluations(4)
    ordered = messages(grid, [1000, 1001, 1002, 1003], kind=MessageType.TRAIN)
    alongside = messages(grid, [1002, 1001], kind=MessageType.EVALUATE)
    flight = InOrder(grid, ordered, 60.0, 1, alongside, poll=0)
    positions = [position for position, reply in flight if reply is not None]
    assert positions == [0, 1, 2, 3]
    assert len(flight.alongside_replies) == 2
    events = grid.events
    for node in (1001, 1002):
        answered = events.index(("reply", node, MessageType.EVALUATE))
        assert answered < events.index(("push", node, MessageType.TRAIN)), events
    # Node 1000 has no alongside message: its train went out before any reply.
    assert events[0] == ("push", 1000, MessageType.TRAIN)
    assert events.index(("reply", 1000, MessageType.TRAIN)) < events.index(
        ("reply", 1002, MessageType.EVALUATE)
    )


def test_silent_node_is_given_up_and_frees_its_slot(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("server_app.engine.exchange.time.monotonic", lambda: clock[0])

    def sleep(seconds):
        clock[0] += 1.0

    monkeypatch.setattr("server_app.engine.exchange.time.sleep", sleep)
    grid = SlowGrid(4, silent={1000})
    replies = exchange(grid, messages(grid, range(1000, 1004)), 5.0, 1)
    # the silent first node holds the only slot until its timeout; then the rest run
    assert len(replies) == 3 and len(grid.sent) == 4
    assert clock[0] >= 5.0


def test_window_does_not_change_results_and_sequential_rounds_evaluate_apart(
    tmp_path_factory, tmp_path
):
    """Every window gives the same numbers; a sequential round carries the
    previous evaluation only when all its messages fit in the window."""
    folder = write_learnable_imagefolder(tmp_path_factory.mktemp("f"), 6, 24)
    config = base_config(folder, tmp_path, **{"num-server-rounds": 2})
    keys = ["round", "accuracy", "client_accuracy", "train_loss", "loss"]
    outcome = {}
    for window in (0, 1, 3):
        cfg = config | {"run-name": f"w{window}", "max-in-flight": window}
        _, grid, _, rows = run(cfg, 4)
        outcome[window] = [{k: r[k] for k in keys} for r in rows]
        kinds = [
            m.metadata.message_type
            for m in grid.sent
            if m.metadata.message_type != MessageType.QUERY  # the handshake
        ]
        # 4 clients: windows 0 and 4+ carry round 1's evaluation inside round
        # 2's train phase, smaller windows evaluate after each round (4 + 4).
        # Carried, the first hn-window = 2 train messages of round 2 take two
        # of round 1's evaluations along.
        assert kinds.count(MessageType.EVALUATE) == (6 if window == 0 else 8)
        first_train_of_round_2 = kinds.index(MessageType.TRAIN, 4)
        evaluations_before = kinds[:first_train_of_round_2].count(MessageType.EVALUATE)
        assert evaluations_before == (0 if window == 0 else 4), window
    assert outcome[0] == outcome[1] == outcome[3]
    assert json.dumps(outcome[0])  # plain numbers


def test_side_by_side_pairs_equal_sizes_and_leaves_one_size_alone():
    rng = np.random.default_rng(0)
    order = [f"c{i}" for i in range(10)]
    one_size = dict.fromkeys(order, 7)
    state = rng.bit_generator.state
    assert side_by_side(order, one_size, 2, rng) is order
    assert rng.bit_generator.state == state  # nothing drawn: runs stay bit-identical
    sizes = {name: (3, 1, 4, 1, 5)[i % 5] for i, name in enumerate(order)}
    assert side_by_side(order, sizes, 1, rng) is order  # one in flight: no waiting
    grouped = side_by_side(order, sizes, 2, rng)
    assert sorted(grouped) == sorted(order)
    pairs = [grouped[i : i + 2] for i in range(0, 10, 2)]
    assert all(sizes[a] == sizes[b] for a, b in pairs), grouped
    # Seeded: the same generator state gives the same order.
    again = np.random.default_rng(0)
    side_by_side(order, one_size, 2, again)
    assert side_by_side(order, sizes, 2, again) == grouped


@pytest.mark.parametrize("hn_order", ["random", "by-size"])
def test_a_sequential_round_keeps_equal_sizes_in_flight_together(
    tmp_path_factory, tmp_path, hn_order
):
    """Two cnn and two mlp clients, two in flight: ``by-size`` sends each round's
    train messages in pairs of one size; ``random`` is the seeded permutation."""
    folder = write_learnable_imagefolder(tmp_path_factory.mktemp("f"), 4, 12)
    config = base_config(folder, tmp_path, **{
        "num-server-rounds": 3, "models": "cnn,mlp", "hn-window": 2,
        "hn-order": hn_order, "eval-every": 3})  # fmt: skip
    strategy, grid, _, rows = run(config, 4)
    size = {c.node_id: c.num_params for c in strategy.clients}
    assert len(set(size.values())) == 2
    train = [
        size[m.metadata.dst_node_id]
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN
    ]
    rounds = [train[i : i + 4] for i in range(0, 12, 4)]
    paired = [r[0] == r[1] and r[2] == r[3] for r in rounds]
    if hn_order == "by-size":
        assert all(paired), rounds
    else:
        assert not all(paired), rounds  # seed 42 mixes them at least once
    assert rows[-1]["accuracy"] > 0.25
