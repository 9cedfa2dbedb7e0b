"""Client state on disk (node config ``state-dir``): client_app.persist."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from client_app import persist
from server_app.engine.loop import Engine
from tests.helpers import base_config, run, write_learnable_imagefolder


def records() -> RecordDict:
    rng = np.random.default_rng(0)
    return RecordDict(
        {
            "model-buffers": ArrayRecord(
                {
                    "bn.running_mean": Array(rng.normal(size=16).astype(np.float32)),
                    "bn.num_batches_tracked": Array(np.array([7], dtype=np.int64)),
                }
            ),
            "model-params": ArrayRecord(
                {"theta": Array(rng.normal(size=(3, 5)).astype(np.float64))}
            ),
            "other": ConfigRecord({"not": "saved"}),
        }
    )


def context(tmp_path, run_id: int = 5, state: RecordDict | None = None, **node):
    node_config = {"state-dir": str(tmp_path / "state"), **node}
    return Context(
        run_id=run_id,
        node_id=1,
        node_config=node_config,
        state=state if state is not None else RecordDict(),
        run_config={},
    )


def files(
    tmp_path, name: str = "site-a", key: str = "run-a", resumed_at: int = 0, every=2
) -> persist.StateFiles:
    return persist.StateFiles(tmp_path / "state", name, key, resumed_at, every)


def assert_same_arrays(a: RecordDict, b: RecordDict, names) -> None:
    for name in names:
        ra, rb = a[name], b[name]
        assert list(ra) == list(rb)
        for key in ra:
            x, y = ra[key].numpy(), rb[key].numpy()
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def test_round_trip_keeps_names_dtypes_shapes_and_header(tmp_path):
    path = tmp_path / "s" / "site-a.npz"
    state = records()
    assert persist.save_state(path, state, {"run-id": 5, "round": 3}) == 2
    header, loaded = persist.load_state(path)
    assert header["run-id"] == 5 and header["round"] == 3
    assert set(loaded) == {"model-buffers", "model-params"}  # ArrayRecords only
    assert_same_arrays(state, RecordDict(loaded), loaded)
    assert [p.name for p in path.parent.iterdir()] == ["site-a.npz"]  # no temp left


def test_restore_fills_a_fresh_state_of_the_same_run_once(tmp_path):
    saved = context(tmp_path, state=records())
    persist.save(saved, files(tmp_path), server_round=2)
    assert (tmp_path / "state" / "site-a.npz").is_file()

    fresh = context(tmp_path)  # a restarted SuperNode: empty context.state
    assert persist.restore(fresh, files(tmp_path)) == 2
    assert_same_arrays(saved.state, fresh.state, ["model-buffers", "model-params"])
    assert persist.MARKER in fresh.state
    # Synced: later messages of this SuperNode process do not read the file again.
    del fresh.state["model-params"]
    assert persist.restore(fresh, files(tmp_path)) == 0
    assert "model-params" not in fresh.state


def test_a_file_of_another_run_or_client_is_not_restored(tmp_path):
    persist.save(context(tmp_path, state=records()), files(tmp_path), server_round=1)
    for other in (
        files(tmp_path, key="run-b"),  # another run, same Flower run id
        files(tmp_path, key="run-b", resumed_at=1),
        files(tmp_path, name="site-b"),
    ):
        fresh = context(tmp_path)
        assert persist.restore(fresh, other) == 0
        assert "model-params" not in fresh.state
    # The same run, resumed in a new Flower run: only state saved by the round it
    # resumed after is its own.
    assert persist.restore(context(tmp_path, run_id=6), files(tmp_path)) == 0
    assert persist.restore(context(tmp_path, run_id=6), files(tmp_path, resumed_at=1))


def test_a_resumed_run_gets_the_state_of_its_checkpoint_round(tmp_path):
    """Saved after rounds 1-3 with checkpoint-every = 2: the round-2 state is kept
    beside the latest, so a run resumed after round 2 gets it even though the lost
    run went on to round 3; resumed after round 3 it gets the latest."""
    ctx = context(tmp_path, state=records())
    for server_round in (1, 2, 3):
        ctx.state["model-params"]["theta"] = Array(np.full((3, 5), server_round * 1.0))
        persist.save(ctx, files(tmp_path), server_round)
    folder = tmp_path / "state"
    assert sorted(p.name for p in folder.iterdir()) == [
        "site-a.checkpointed.npz",
        "site-a.npz",
    ]

    def theta_restored(resumed_at: int) -> float | None:
        fresh = context(tmp_path, run_id=7)  # a new Flower run each time
        persist.restore(fresh, files(tmp_path, resumed_at=resumed_at))
        if "model-params" not in fresh.state:
            return None
        return float(fresh.state["model-params"]["theta"].numpy()[0, 0])

    assert theta_restored(2) == 2.0
    assert theta_restored(3) == 3.0
    assert theta_restored(0) is None  # not resumed: another run's files

    # Resumed after round 2, the client saves round 3 again: the round-2 state is
    # still the checkpointed one until round 4 passes the next checkpoint.
    resumed = context(tmp_path, run_id=6)
    persist.restore(resumed, files(tmp_path, resumed_at=2))
    resumed.state["model-params"]["theta"] = Array(np.full((3, 5), 33.0))
    persist.save(resumed, files(tmp_path, resumed_at=2), 3)
    assert theta_restored(2) == 2.0
    assert theta_restored(3) == 33.0


def test_node_config_state_dir_comes_before_the_run_config_one(tmp_path):
    from common.config import load_run_config

    cfg = load_run_config({"client-state-dir": str(tmp_path / "run")})
    config = ConfigRecord({"run-key": "k", "resumed-at": 4})
    got = persist.StateFiles.of(context(tmp_path), cfg, "site-a", config)
    assert got == persist.StateFiles(tmp_path / "state", "site-a", "k", 4, 10)
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                   run_config={})  # fmt: skip
    assert persist.StateFiles.of(bare, cfg, "site-a", config).folder == tmp_path / "run"
    assert persist.StateFiles.of(bare, load_run_config({}), "a", config) is None


def test_without_state_dir_nothing_is_written_or_read(tmp_path):
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=records(), run_config={}
    )  # fmt: skip
    assert persist.save(ctx, None, 1) == 0
    assert persist.restore(ctx, None) == 0
    assert persist.MARKER not in ctx.state
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "site-a.npz"
    persist.save_state(path, records(), {"run-id": 5, "round": 1})
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(persist.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        persist.save_state(path, records(), {"run-id": 5, "round": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["site-a.npz"]
    monkeypatch.undo()

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(persist.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        persist.save_state(path, records(), {"run-id": 5, "round": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["site-a.npz"]
    header, _ = persist.load_state(path)
    assert header["round"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"not a state file at all",
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_corrupt_file_gives_an_error_naming_it(tmp_path, damage):
    path = tmp_path / "state" / "site-a.npz"
    persist.save(context(tmp_path, state=records()), files(tmp_path), server_round=1)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(persist.StateFileError, match=str(path)):
        persist.restore(context(tmp_path), files(tmp_path))


def test_a_state_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "site-a.npz"
    np.savez(path, x=np.zeros(3))  # a valid npz, but no header
    with pytest.raises(persist.StateFileError, match="site-a.npz"):
        persist.load_state(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_learnable_imagefolder(tmp_path_factory.mktemp("persist"), 4, 10)


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("local", {}),  # keeps model-params and model-buffers
        ("mh-pfedhn", {"chunk-size": 16384, "hidden-dim": 16}),  # model-buffers
    ],
)
def test_a_restarted_client_continues_exactly_with_its_saved_state(
    folder, tmp_path, strategy, extra
):
    """Through the real ClientApp: node 1001 loses its context.state after round 1
    (a SuperNode restart). With ``state-dir`` the run equals the uninterrupted one;
    without it, the client's kept state (personal model / BatchNorm statistics) is
    lost and the numbers change."""

    def config(name):
        return base_config(
            folder,
            tmp_path,
            **{
                "run-name": name,
                "strategy": strategy,
                "models": "resnet10",  # BatchNorm: running statistics to keep
                "num-server-rounds": 2,
                **extra,
            },
        )

    def restarting(state_dir):
        def node_configs():
            return {
                pid: {"state-dir": str(state_dir)} if state_dir else {}
                for pid in range(2)
            }

        class Restart(Engine):
            calls = 0

            def admit_new_nodes(self, grid, results):
                self.calls += 1
                if self.calls == 2:  # round 2 starts: node 1001 restarted
                    old = grid.contexts[1001]
                    grid.contexts[1001] = Context(
                        run_id=old.run_id,
                        node_id=1001,
                        node_config=dict(old.node_config),
                        state=RecordDict(),
                        run_config=dict(old.run_config),
                    )
                super().admit_new_nodes(grid, results)

        return Restart, node_configs()

    _, _, _, plain = run(config("plain"), 2)
    cls, nodes = restarting(tmp_path / "state")
    _, grid, _, kept = run(config("kept"), 2, engine=cls, node_configs=nodes)
    assert (tmp_path / "state" / "client-1.npz").is_file()
    assert [r["client_accuracy"] for r in kept] == [r["client_accuracy"] for r in plain]
    assert [r["loss"] for r in kept] == [r["loss"] for r in plain]

    cls, nodes = restarting(None)
    _, _, _, lost = run(config("lost"), 2, engine=cls, node_configs=nodes)
    assert [r["loss"] for r in lost] != [r["loss"] for r in plain]
