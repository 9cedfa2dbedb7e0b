"""The pure-Python parts of the simulation benchmarks (no ``flwr run`` here).

``bench.round``'s split of a round into server, client and other seconds,
``bench.simulation``'s reading of ``/proc`` (from a fake ``/proc`` tree) and its
per-kind memory peaks, the log parsing of ``bench.scale``, and the per-round sums
of client-reported compute that the server now records (in-process grid).
"""

from __future__ import annotations

import os

import pytest

from bench.round import cpu_split, parse_overrides, split_round, summarise
from bench.scale import growth, hypernetwork_facts, round_seconds
from bench.simulation import (
    contention_note,
    cpu_between,
    cpu_rows,
    cpu_seconds,
    cpu_share,
    idle_between,
    machine_busy_seconds,
    mem_available_mb,
    peak_rss_mb,
    process_kind,
    process_state,
    read_process,
    round_logged_at,
    sample,
    summarise_samples,
    train_only_rounds,
)


def row(rnd, round_s, server_s, train_sum, eval_sum, messages=20):
    return {
        "round": rnd,
        "round_seconds": round_s,
        "server_seconds": server_s,
        "client_train_seconds_sum": train_sum,
        "client_eval_seconds_sum": eval_sum,
        "client_messages": messages,
    }


def test_split_round_subtracts_server_and_client_wall():
    split = split_round(row(2, 10.0, 1.0, 14.0, 2.0), workers=2)
    assert split["client_sum_s"] == 16.0
    assert split["client_wall_s"] == 8.0
    assert split["other_s"] == pytest.approx(1.0)
    assert split["other_share"] == pytest.approx(0.1)


def test_split_round_needs_the_client_sums():
    with pytest.raises(ValueError, match="client_train_seconds_sum"):
        split_round({"round": 1, "round_seconds": 1.0, "server_seconds": 0.1}, 2)


def test_summarise_drops_warmup_and_last_round():
    rows = [
        row(1, 30.0, 5.0, 10.0, 0.0),  # warm-up: dropped
        row(2, 10.0, 1.0, 14.0, 2.0),  # other 1.0
        row(3, 12.0, 1.0, 16.0, 2.0),  # other 2.0
        row(4, 50.0, 1.0, 16.0, 4.0),  # last (final evaluation): dropped
    ]
    result = summarise(rows, workers=2)
    assert result["kept_rounds"] == [2, 3]
    assert result["mean"]["round_s"] == pytest.approx(11.0)
    assert result["mean"]["other_s"] == pytest.approx(1.5)
    assert result["other_share"] == pytest.approx(3.0 / 22.0)
    # 3 seconds of other on 2 workers over 40 messages
    assert result["other_per_message_s"] == pytest.approx(6.0 / 40)
    assert len(result["rounds"]) == 4
    with pytest.raises(ValueError, match="no round left"):
        summarise(rows[:2], workers=2)


def test_parse_overrides():
    assert parse_overrides(["hn-window=1", "models=cnn", "x=0.5", 'y="a b"']) == {
        "hn-window": 1,
        "models": "cnn",
        "x": 0.5,
        "y": "a b",
    }


# -- /proc -------------------------------------------------------------------------
STATUS = """Name:\t{name}
Umask:\t0022
State:\tS (sleeping)
Pid:\t{pid}
PPid:\t{ppid}
VmPeak:\t 9999999 kB
VmHWM:\t {hwm} kB
VmRSS:\t {rss} kB
Threads:\t4
"""
ROLLUP = """5580c356c000-7ffdbc3a4000 ---p 00000000 00:00 0   [rollup]
Rss:               {rss} kB
Pss:               {pss} kB
Pss_Anon:            112 kB
"""


def fake_stat(pid, ppid, name="python3", utime=0, stime=0):
    """A ``/proc/<pid>/stat`` line: ppid is field 4, utime/stime fields 14/15."""
    fields = ["S", ppid, 1, 1, 0, -1, 0, 5, 0, 0, 0, utime, stime] + [0] * 39
    return f"{pid} ({name}) " + " ".join(map(str, fields)) + "\n"


def fake_process(
    proc, pid, ppid, argv, rss, hwm, pss=None, name="python3", utime=0, stime=0
):
    base = proc / str(pid)
    base.mkdir(parents=True)
    (base / "status").write_text(
        STATUS.format(name=name, pid=pid, ppid=ppid, rss=rss, hwm=hwm)
    )
    (base / "stat").write_text(fake_stat(pid, ppid, name, utime, stime))
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if pss is not None:
        (base / "smaps_rollup").write_text(ROLLUP.format(rss=rss, pss=pss))


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["ray::ClientAppActor.run"] + [""] * 20, "ray ClientAppActor"),
        (["ray::ClientAppActor"], "ray ClientAppActor"),
        (["ray::IDLE"], "ray idle worker"),
        (["ray::DashboardAgent"], "ray agents"),
        (["/v/bin/python3", "/v/bin/flower-superlink", "--simulation"], "SuperLink"),
        (["/v/bin/python3", "/v/bin/flower-superexec", "--insecure"], "SuperExec"),
        (
            ["/v/bin/python3", "/v/bin/flwr-simulation", "--token", "x"],
            "flwr-simulation (ServerApp)",
        ),  # fmt: skip
        (["/v/bin/python3", "/v/bin/flwr", "run", "/app", "e2e"], "flwr run (CLI)"),
        (["/v/site-packages/ray/core/src/ray/raylet/raylet", "--x"], "raylet"),
        (["/v/site-packages/ray/core/src/ray/gcs/gcs_server", "--x"], "gcs_server"),
        (
            ["/v/bin/python3", "/v/ray/_private/workers/default_worker.py"],
            "ray worker",
        ),  # fmt: skip
        (
            ["/v/bin/python3", "-u", "/v/site-packages/ray/_private/log_monitor.py"],
            "ray agents",
        ),  # fmt: skip
        (["/bin/bash"], "other"),
        ([], "other"),
    ],
)
def test_process_kind(argv, kind):
    assert process_kind(argv) == kind


def test_read_process_and_sample_from_a_fake_proc(tmp_path):
    proc = tmp_path / "proc"
    fake_process(proc, 100, 1, ["/v/bin/python3", "/v/bin/flower-superlink"],
                 rss=1000, hwm=1500, pss=800)  # fmt: skip
    fake_process(proc, 101, 100, ["/v/bin/python3", "/v/bin/flwr-simulation"],
                 rss=4096, hwm=8192, pss=3000, utime=250, stime=50)  # fmt: skip
    fake_process(proc, 102, 101, ["ray::ClientAppActor"], rss=2048, hwm=2048)
    fake_process(proc, 200, 1, ["/bin/bash"], rss=10, hwm=10, pss=5)  # not ours
    (proc / "meminfo").write_text(
        "MemTotal:       24000000 kB\nMemAvailable:   16777216 kB\n"
    )
    server = read_process(101, proc)
    tick = os.sysconf("SC_CLK_TCK")
    assert server == {
        "pid": 101,
        "kind": "flwr-simulation (ServerApp)",
        "rss_kb": 4096,
        "hwm_kb": 8192,
        "pss_kb": 3000,
        "cpu_s": 300 / tick,
        "state": "S",
    }
    assert read_process(102, proc)["pss_kb"] == 2048  # no smaps_rollup: RSS
    assert read_process(101, proc, pss=False)["pss_kb"] == 4096  # not read: RSS
    assert read_process(999, proc) is None
    fake_process(proc, 103, 101, [], rss=10, hwm=10)  # exiting: empty cmdline
    assert read_process(103, proc) is None
    assert mem_available_mb(proc) == 16384.0


def test_sample_reads_the_descendants(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    fake_process(proc, 100, 1, ["/v/bin/python3", "/v/bin/flower-superlink"],
                 rss=1000, hwm=1500, pss=800)  # fmt: skip
    fake_process(proc, 101, 100, ["ray::ClientAppActor"], rss=2048, hwm=2048)
    fake_process(proc, 200, 1, ["/bin/bash"], rss=10, hwm=10, pss=5)
    import bench.simulation as simulation

    # the process tree itself comes from tools.processes.descendants (real /proc)
    monkeypatch.setattr(
        simulation, "descendants", lambda pid: {1: [100, 101, 200], 100: [101]}[pid]
    )
    assert [p["pid"] for p in sample(100, proc)] == [101]
    assert {p["kind"] for p in sample(1, proc)} == {
        "SuperLink",
        "ray ClientAppActor",
        "other",
    }


def test_cpu_seconds_of_a_stat_line_with_odd_command_names():
    line = fake_stat(7, 1, name="ray::IDLE) (x", utime=120, stime=30)
    assert cpu_seconds(line, tick=100) == 1.5


def test_machine_busy_seconds_and_shares(tmp_path):
    (tmp_path / "stat").write_text(
        "cpu  1000 10 190 5000 300 0 0 0 0 0\ncpu0 500 5 95 2500 150 0 0 0 0 0\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    busy, total = machine_busy_seconds(tmp_path)
    assert busy == 1200 / tick and total == 6500 / tick
    share = cpu_share(machine_busy_s=150.0, ours_s=100.0, elapsed_s=100.0, cpus=2)
    assert share["foreign_cpu_s"] == 50.0
    assert share["ours_cpu_share"] == 0.5 and share["foreign_cpu_share"] == 0.25
    quiet = {"cpu": cpu_share(101.0, 100.0, 100.0, 2)}
    assert "NOT a quiet machine" in contention_note({"cpu": share})
    assert "NOT" not in contention_note(quiet)


def reading(*procs, cpu=0.0):
    return [
        {
            "pid": pid,
            "kind": kind,
            "rss_kb": rss,
            "hwm_kb": hwm,
            "pss_kb": pss,
            "cpu_s": cpu * pid,
        }  # fmt: skip
        for pid, kind, rss, hwm, pss in procs
    ]


def test_summarise_samples_peaks_per_kind_and_total():
    samples = [
        reading((1, "server", 1024, 2048, 512), (2, "actor", 1024, 1024, 1024)),
        reading(
            (1, "server", 2048, 4096, 1024),
            (2, "actor", 2048, 3072, 1024),
            (3, "actor", 1024, 1024, 512),
        ),  # fmt: skip
        reading((1, "server", 1024, 4096, 512), cpu=2.0),
    ]
    samples[0][1]["kind"] = "ray worker"  # before it named itself: counts as actor
    s = summarise_samples(samples)
    server, actor = s["kinds"]["server"], s["kinds"]["actor"]
    assert server == {
        "processes": 1,
        "peak_rss_mb": 2.0,
        "peak_pss_mb": 1.0,
        "peak_hwm_mb": 4.0,
        "sum_hwm_mb": 4.0,
        "pids_seen": 1,
        "cpu_s": 2.0,  # the last reading of a cumulative counter
    }
    assert actor["processes"] == 2 and actor["pids_seen"] == 2
    assert set(s["kinds"]) == {"server", "actor"}
    assert actor["peak_rss_mb"] == 3.0  # 2048 + 1024 kB in the second reading
    assert actor["peak_hwm_mb"] == 3.0 and actor["sum_hwm_mb"] == 4.0
    assert s["total_peak_rss_mb"] == 5.0
    assert s["total_peak_pss_mb"] == 2.5
    assert s["total_sum_hwm_mb"] == 8.0
    assert s["samples"] == 3
    assert actor["cpu_s"] == 0.0 and s["total_cpu_s"] == 2.0
    assert [r["kind"] for r in cpu_rows(s)] == ["server", "actor"]
    assert cpu_rows(s)[0]["share"] == 1.0


def cpu_reading(**cpu_by_pid):
    kinds = {"p1": "server", "p2": "actor", "p3": "actor", "p4": "raylet"}
    return [
        {"pid": int(k[1:]), "kind": kinds[k], "cpu_s": v} for k, v in cpu_by_pid.items()
    ]


def test_cpu_between_differences_of_cumulative_cpu():
    samples = [
        cpu_reading(p1=1.0, p2=0.5, p4=0.1),
        cpu_reading(p1=2.0, p2=2.5, p3=1.0, p4=0.2),
        cpu_reading(p1=4.0, p3=3.0, p4=0.3),  # p2 is gone: keeps 2.5
    ]
    times = [10.0, 11.0, 12.0]
    assert cpu_between(samples, times, 10.0, 12.0) == {
        "actor": (2.5 - 0.5) + 3.0,  # p3 unseen at the start: from 0
        "raylet": pytest.approx(0.2),
        "server": 3.0,
    }
    # bounds between readings take the reading before them
    assert cpu_between(samples, times, 10.5, 11.9) == {
        "actor": 3.0,
        "raylet": pytest.approx(0.1),
        "server": 1.0,
    }
    assert cpu_between(samples, times, 0.0, 5.0) == {}


def test_cpu_split_per_round_window():
    rows = [
        {
            "round": r,
            "finished_at": 100.0 + 10 * r,
            "server_seconds": 1.0,
            "client_cpu_seconds_sum": 6.0,
            "client_messages": 20,
        }  # fmt: skip
        for r in (1, 2, 3)
    ]
    windows = []

    def between(a, b):
        windows.append((a, b))
        return {"ray ClientAppActor": 8.0, "flwr-simulation (ServerApp)": 1.5,
                "raylet": 0.5}  # fmt: skip

    cpu = cpu_split(rows, between, kept=[2], cores=2)
    assert windows == [(110.0, 120.0)]
    (r,) = cpu["rounds"]
    assert r["total_cpu_s"] == 10.0 and r["loops_cpu_s"] == 6.0
    assert r["clientapp_cpu_s"] == 2.0 and r["flower_ray_cpu_s"] == 0.5
    assert r["other_cpu_share"] == pytest.approx(2.5 / 10)
    assert cpu["other_cpu_share"] == pytest.approx(0.25)
    assert cpu["clientapp_cpu_per_message_s"] == pytest.approx(0.1)
    assert r["cpu_bound_s"] == cpu["cpu_bound_s"] == 5.0


# -- logs of bench.scale ---------------------------------------------------------------
LINES = [
    (1.0, "\x1b[92mINFO \x1b[0m:      Starting MH-pFedHN\n"),
    (
        42.5,
        "\x1b[92mINFO \x1b[0m:      Hypernetwork: 1000 clients, 1 heads "
        "(chunk counts 77), 39.6 M parameters\n",
    ),  # fmt: skip
    (60.0, "\x1b[92mINFO \x1b[0m:      round 1/3 | train loss 0.6931 | 17.25 s\n"),
    (72.0, "\x1b[92mINFO \x1b[0m:      round 2/3 | train loss nan | 11.50 s\n"),
    (
        300.0,
        "\x1b[92mINFO \x1b[0m:      round 3/3 | acc 0.5 (client mean 0.5) | "
        "loss 0.7 | 228.0 s (server 30.0 s) | down 1.0 MB up 0.1 MB\n",
    ),  # fmt: skip
]


def test_round_seconds_from_log_lines_and_rows():
    assert train_only_rounds(LINES) == {1: 17.25, 2: 11.5}
    assert round_logged_at(LINES, 2) == 72.0 and round_logged_at(LINES, 3) is None
    rows = [{"round": 3, "train_seconds": 12.5, "round_seconds": 228.0}]
    assert round_seconds(LINES, rows) == {1: 17.25, 2: 11.5, 3: 12.5}


def test_hypernetwork_facts():
    clients = [{"chunks": 77}] * 1000
    facts = hypernetwork_facts(LINES, clients, embed_dim=64)
    assert facts["hn_params_m"] == 39.6 and facts["setup_s"] == 42.5
    assert facts["embedding_floats"] == 1000 * 77 * 64
    assert facts["embedding_mb"] == pytest.approx(1000 * 77 * 64 * 4 / 2**20)
    assert facts["embedding_adam_mb"] == pytest.approx(3 * facts["embedding_mb"])


def test_peak_rss_mb_of_a_kind_until_a_time():
    samples = [
        reading((1, "server", 1024, 1024, 0), (2, "actor", 4096, 4096, 0)),
        reading((1, "server", 2048, 2048, 0), (3, "server", 1024, 1024, 0)),
        reading((1, "server", 8192, 8192, 0)),
    ]
    times = [1.0, 2.0, 3.0]
    assert peak_rss_mb(samples, times, "server") == 8.0
    assert peak_rss_mb(samples, times, "server", until=2.5) == 3.0
    assert peak_rss_mb(samples, times, "server", until=0.5) is None


def test_growth():
    def result(n, server, emb, seconds):
        return {
            "clients": n,
            "server_peak_rss_mb": server,
            "server_rss_training_mb": server / 2,
            "embedding_mb": emb,
            "embedding_adam_mb": 3 * emb,
            "s_per_round": seconds,
            "memory": {"kinds": {}, "total_peak_pss_mb": server * 2},
        }

    change = growth([result(100, 1000.0, 2.0, 2.0), result(1000, 1100.0, 20.0, 10.0)])
    assert change["server_peak_rss_mb"] == 100.0
    assert change["server_rss_training_mb"] == 50.0
    assert change["embedding_mb"] == 18.0 and change["embedding_adam_mb"] == 54.0
    assert change["s_per_round_ratio"] == 5.0
    assert growth([result(100, 1.0, 1.0, 1.0)]) is None


# -- what the server records -----------------------------------------------------------
@pytest.mark.parametrize(
    ("update", "messages"),
    [
        # sequential: round r's window holds round r-1's evaluation (the first
        # hn-window = 2 train messages carry theirs, one EVALUATE message for the
        # third client), the last round also its own evaluation
        ({"hn-window": 2}, [3, 4, 7]),
        # mean: the evaluation rides inside the next round's train replies
        ({"hn-update": "mean"}, [3, 3, 6]),
    ],
)
def test_server_records_client_compute_per_round(tmp_path, update, messages):
    from tests.helpers import base_config, run, write_learnable_imagefolder

    folder = write_learnable_imagefolder(tmp_path / "folder", 6, 24)
    config = base_config(folder, tmp_path, **update, **{"hidden-dim": 16})
    _, _, _, rows = run(config, 3)
    assert [r["client_messages"] for r in rows] == messages
    for r in rows:
        assert 0 < r["client_train_seconds_sum"] < r["round_seconds"] * 3
        # round 1's window holds no evaluation
        assert (r["client_eval_seconds_sum"] > 0) == (r["round"] > 1)
        assert r["client_cpu_seconds_sum"] > 0
        # the whole handling of the messages costs at least their loops
        assert r["client_message_cpu_seconds_sum"] >= r["client_cpu_seconds_sum"]
        assert r["server_process_cpu_seconds"] > 0
        split = split_round(r, workers=1)
        assert split["client_sum_s"] > 0
    assert rows[0]["finished_at"] < rows[1]["finished_at"] < rows[2]["finished_at"]


# -- bench.round's idle workers and references -----------------------------------------
def test_process_state_and_idle_between():
    assert process_state(fake_stat(5, 1)) == "S"
    assert process_state("7 (ray::ClientAppActor) R 1 1 1") == "R"
    actor = "ray ClientAppActor"

    def reading(pid_states):
        return [{"pid": pid, "kind": actor, "state": s} for pid, s in pid_states]

    times = [10.0, 10.5, 11.0, 11.5, 12.0]
    samples = [
        reading([(1, "R"), (2, "S")]),
        reading([(1, "R"), (2, "S")]),
        reading([(1, "S"), (2, "R")]),  # waiting for a core counts as busy
        reading([(1, "R"), (2, "R")]),
        reading([(1, "R"), (2, "R")]),
    ]
    whole = idle_between(samples, times, 10.0, 12.0, actor)
    assert whole == {"idle_s": 1.5, "seen_s": 4.0, "processes": 2}
    # only the intervals inside the window count
    assert idle_between(samples, times, 10.5, 11.5, actor)["idle_s"] == 1.0
    assert idle_between(samples, times, 10.0, 12.0, "other")["seen_s"] == 0


def test_model_flops_counts_the_cnn_by_hand():
    from bench.sequential import model_flops

    conv1, conv2 = 2 * 3 * 16 * 9 * 32 * 32, 2 * 16 * 32 * 9 * 16 * 16
    linear = 2 * (2048 * 108 + 108 * 64 + 64 * 10)
    forward = conv1 + conv2 + linear
    flops = model_flops("cnn")
    assert flops["eval"] == forward
    # backward: weight gradients of every layer, input gradients of all but the
    # first (the images need none)
    assert flops["train"] == 3 * forward - conv1


def test_sequential_loop_and_round_flops_on_a_small_federation(tmp_path):
    from bench.sequential import conv_throughput, round_flops, sequential_loop
    from tests.helpers import write_learnable_imagefolder

    folder = write_learnable_imagefolder(tmp_path / "folder", 4, 24)
    config = {
        "dataset": "imagefolder",
        "data-dir": str(folder),
        "models": "cnn,vgg8",
        "chunk-size": 1024,
        "hidden-dim": 16,
    }
    loop = sequential_loop(config, clients=2, rounds=2)
    assert [r["round"] for r in loop["rounds"]] == [1, 2]
    assert set(loop["per_model"]) == {"cnn", "vgg8"}
    for r in loop["rounds"]:
        assert r["round_s"] >= r["train_s"] + r["eval_s"] > 0
        assert 0 <= r["accuracy"] <= 1
    flops = round_flops(config, clients=2)
    assert set(flops["per_model"]) == {"cnn", "vgg8"}
    assert flops["total"] == sum(
        v["train"] + v["eval"] for v in flops["per_model"].values()
    )
    assert conv_throughput(["cnn"], seconds=0.01)["gflops"] > 0
    bf16 = conv_throughput(["cnn"], seconds=0.01, precision="bf16")
    assert bf16["gflops"] > 0 and bf16["precision"] == "bf16"


def test_step_bench_measures_every_setting_in_its_own_process(tmp_path, capsys):
    import json

    from bench.step import SETTINGS, main

    main(["--models", "cnn", "--reps", "1", "--steps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "step.json").read_text())
    measured = result["models"]["cnn"]
    assert set(measured) == set(SETTINGS)
    assert all(m["ms"] > 0 and m["faults"] >= 0 for m in measured.values())
    assert "| cnn |" in capsys.readouterr().out
