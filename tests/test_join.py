"""SuperNodes that connect after round 1: new clients join, restarted ones resume."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from server_app.engine.loop import Engine
from tests.helpers import base_config, run, write_learnable_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("join"), 6, 24)


def at_round(change):
    """An engine that applies ``change(algorithm, grid)`` just before round 2
    starts; ``Changing.last`` is the last one built."""

    class Changing(Engine):
        last = None

        def __init__(self, algorithm, cfg):
            super().__init__(algorithm, cfg)
            Changing.last = self

        def admit_new_nodes(self, grid, results):
            if not getattr(self, "_changed", False) and self.clients:
                if len(results.records) == 1:  # round 1 is done
                    change(self.algorithm, grid)
                    self._changed = True
            super().admit_new_nodes(grid, results)

    return Changing


def context(node_id: int, config: dict, **node_config) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
        run_config=dict(config),
    )  # fmt: skip


def test_a_node_connecting_later_joins_with_a_fresh_embedding(folder, tmp_path):
    config = base_config(folder, tmp_path, **{"run-name": "late", "hn-window": 0})
    absent = {}

    def connect(strategy, grid):
        grid.contexts[1003] = absent.pop("node")

    class Late(at_round(connect)):
        def start(self, grid, results):
            absent["node"] = grid.contexts.pop(1003)  # not there at the handshake
            return super().start(grid, results)

    strategy, _, results, rows = run(config, 4, engine=Late)
    assert set(rows[0]["client_accuracy"]) == {"client-0", "client-1", "client-2"}
    assert set(rows[1]["client_accuracy"]) == {f"client-{i}" for i in range(4)}
    assert "client-3" in strategy.hn.embeddings
    clients = json.loads((results.path / "clients.json").read_text())
    assert len(clients) == 4


def test_a_restarted_node_keeps_its_embedding_and_a_duplicate_is_refused(
    folder, tmp_path
):
    config = base_config(folder, tmp_path, **{"run-name": "restart"})
    seen = {}

    def restart_and_impersonate(strategy, grid):
        seen["embedding"] = strategy.hn.embeddings["client-1"]
        restarted = grid.contexts.pop(1001)
        grid.contexts[2001] = restarted  # same node config: same client-name
        grid.contexts[3000] = context(
            3000, config, **{"partition-id": 0, "num-partitions": 3}
        )  # claims "client-0" while node 1000 is still connected

    engine = at_round(restart_and_impersonate)
    strategy, grid, results, rows = run(config, 3, engine=engine)
    assert strategy.clients["client-1"].node_id == 2001
    assert strategy.hn.embeddings["client-1"] is seen["embedding"]
    assert strategy.clients["client-0"].node_id == 1000
    assert len(strategy.clients) == 3 and 3000 in engine.last.refused_nodes
    assert all(len(r["client_accuracy"]) == 3 for r in rows)
    clients = json.loads((results.path / "clients.json").read_text())
    assert {c["name"]: c["node_id"] for c in clients}["client-1"] == 2001
