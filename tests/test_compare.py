"""`python -m tools.compare`: presets, the table and plot, resuming, one real run.

Everything but the last test works on hand-made results folders and a fake
runner (fast); the last one runs a tiny preset through real `flwr run`.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from client_app import persist
from common.config import load_run_config
from server_app.strategies import available_strategies
from tools import compare, report
from tools.machine import describe as describe_machine
from tools.preset import PresetError, RunSpec, load_preset

ROOT = Path(__file__).resolve().parents[1]
#: Strategies the shipped presets name; some may not be registered yet.
HETERO = [
    "local",
    "lg-fedavg",
    "fedproto",
    "fedgh",
    "fml",
    "fedkd",
    "fd",
    "fedtgp",
    "mh-pfedhn",
    "mh-pfedhngd",
]
PRESET = """
[compare]
strategies = ["local", "fedavg", "mh-pfedhn"]
seeds = [1, 2]
num-supernodes = 3

[run-config]
num-server-rounds = 3
models = "cnn"

[strategy-config.fedavg]
client-lr = 0.01
"""


def write_preset(tmp_path: Path, text: str = PRESET, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- presets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PRESET + "[extra]\n", "unknown section [extra]; allowed sections"),
        ("[run-config]\n", "section [compare] is missing"),
        (
            PRESET.replace("num-supernodes = 3", "num-supernodes = 3\nworkers = 2"),
            "[compare] unknown key 'workers'; allowed keys: title, setting, strategies",
        ),
        (
            PRESET.replace('["local", "fedavg", "mh-pfedhn"]', "[]"),
            "key 'strategies' = [] is not allowed: must be a non-empty list",
        ),
        (
            PRESET.replace("[1, 2]", "[]"),
            "key 'seeds' = [] is not allowed: must be a non-empty list of integers",
        ),
        (PRESET.replace("[1, 2]", "[1, 1]"), "key 'seeds' lists a seed twice"),
        (
            PRESET.replace("num-supernodes = 3\n", ""),
            "key 'num-supernodes' is missing",
        ),
        (
            PRESET.replace('"fedavg", "mh-pfedhn"', '"fedavgg", "nope"'),
            "[compare] key 'strategies': unknown strategies 'fedavgg', 'nope'; "
            "allowed (registered now): ",
        ),
        (
            PRESET.replace("[strategy-config.fedavg]", "[strategy-config.fedavgg]"),
            "[strategy-config.fedavgg]: unknown strategy 'fedavgg'",
        ),
        (
            PRESET.replace('models = "cnn"', 'models = "cnn"\nseed = 3'),
            "[run-config] key 'seed' is not allowed here: it is set per run",
        ),
        (
            PRESET.replace('models = "cnn"', 'models = "cnn"\nresults-dir = "x"'),
            "key 'results-dir' is not allowed here",
        ),
        (
            PRESET.replace("client-lr = 0.01", "client-lr = -1.0"),
            "run fedavg-seed1 ([run-config] + [strategy-config.fedavg]): "
            "run-config key 'client-lr' = -1.0 is not allowed",
        ),
        (
            PRESET.replace('models = "cnn"', 'models = "cnn"\nclient-rate = 1'),
            "run local-seed1 ([run-config]): unknown run-config key 'client-rate'",
        ),
        (
            # fedavg trains one architecture: caught before any run starts.
            PRESET.replace('models = "cnn"', 'models = "cnn,vgg8"'),
            "run fedavg-seed1 ([run-config] + [strategy-config.fedavg]): run-config "
            "key 'models' = 'cnn,vgg8' is not allowed with strategy 'fedavg'",
        ),
        (
            PRESET.replace("num-server-rounds = 3", "num-server-rounds = 0"),
            "needs at least 1 training round",
        ),
        (
            PRESET + "num-server-rounds = 5\n",
            "'num-server-rounds' must be the same for every strategy",
        ),
        (
            PRESET.replace("num-supernodes = 3", "num-supernodes = 3\ntimeout = 0"),
            "key 'timeout' = 0 is not allowed: must be a number > 0",
        ),
        (PRESET.replace("seeds = [1, 2]", "seeds = [1, 2"), "not valid TOML"),
    ],
)
def test_preset_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(PresetError) as err:
        load_preset(write_preset(tmp_path, text))
    assert message in str(err.value)
    assert str(tmp_path / "p.toml") in str(err.value)


def test_unknown_strategy_error_lists_the_registry(tmp_path):
    with pytest.raises(PresetError) as err:
        load_preset(write_preset(tmp_path, PRESET.replace('"local"', '"nope"')))
    assert ", ".join(available_strategies()) in str(err.value)


def test_runs_are_seed_major_with_overrides_and_absolute_paths(tmp_path):
    preset = load_preset(write_preset(tmp_path))
    specs = preset.runs(results_dir=tmp_path / "out" / "runs", data_dir=Path("data"))
    assert [s.name for s in specs] == [
        "local-seed1",
        "fedavg-seed1",
        "mh-pfedhn-seed1",
        "local-seed2",
        "fedavg-seed2",
        "mh-pfedhn-seed2",
    ]
    fedavg = specs[1].run_config
    assert fedavg["strategy"] == "fedavg" and fedavg["seed"] == 1
    assert fedavg["client-lr"] == 0.01 and "client-lr" not in specs[0].run_config
    assert fedavg["run-name"] == "fedavg-seed1" and specs[0].rounds == 3
    assert fedavg["results-dir"] == str(tmp_path / "out" / "runs")
    assert Path(fedavg["data-dir"]).is_absolute()
    assert [s.name for s in preset.runs(seeds=[9], strategies=["local"])] == [
        "local-seed9"
    ]


def test_setting_is_a_run_config_file_under_the_presets_run_config(tmp_path):
    (tmp_path / "setting.toml").write_text('models = "cnn,vgg8"\nbatch-size = 32\n')
    text = PRESET.replace("[compare]\n", '[compare]\nsetting = "setting.toml"\n')
    spec = load_preset(write_preset(tmp_path, text)).runs()[0]
    assert spec.run_config["batch-size"] == 32
    assert spec.run_config["models"] == "cnn"  # [run-config] wins over the setting
    missing = text.replace("setting.toml", "nope.toml")
    with pytest.raises(PresetError, match="key 'setting' = 'nope.toml': no such file"):
        load_preset(write_preset(tmp_path, missing, "q.toml"))
    (tmp_path / "setting.toml").write_text("batch-size = 0\n")
    with pytest.raises(PresetError, match="batch-size"):
        load_preset(write_preset(tmp_path, text, "r.toml"))


def test_rounds_default_is_explicit_in_every_run(tmp_path):
    text = PRESET.replace("num-server-rounds = 3\n", "")
    spec = load_preset(write_preset(tmp_path, text)).runs()[0]
    assert spec.run_config["num-server-rounds"] == spec.rounds == 40


CPU_PRESETS = {
    # preset: (clients, rounds, models)
    "quick-cifar10-cnn.toml": (10, 40, "cnn"),
    "quick-cifar10-5models.toml": (10, 40, "cnn,vgg8,resnet10,resnet12,resnet18"),
    "cifar10-5models-by-size.toml": (10, 40, "cnn,vgg8,resnet10,resnet12,resnet18"),
    "cifar10-5models-hn-window3.toml": (10, 40, "cnn,vgg8,resnet10,resnet12,resnet18"),
    "cifar10-5models-bf16.toml": (10, 40, "cnn,vgg8,resnet10,resnet12,resnet18"),
    "cifar10-cnn-hn-window3.toml": (10, 40, "cnn"),
    "cifar10-cnn-50clients.toml": (50, 100, "cnn"),
    "cifar10-cnn-50clients-hn-window1.toml": (50, 100, "cnn"),
    "cifar10-cnn-50clients-gd-alpha0.toml": (50, 100, "cnn"),
    "cifar10-5models-50clients.toml": (50, 60, "cnn,vgg8,resnet10,resnet12,resnet18"),
}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf" / "compare").glob("*.toml")), ids=str
)
def test_shipped_presets_are_valid(path):
    allowed = sorted(set(available_strategies()) | set(HETERO) | {"pfedhn", "fedavg"})
    preset = load_preset(path, allowed=allowed)
    specs = preset.runs()
    assert len(specs) == len(preset.strategies) * len(preset.seeds)
    if path.name.startswith("paper-"):
        assert preset.strategies == HETERO
        assert preset.run_config["models"] == "cnn,vgg8,resnet10,resnet12,resnet18"
        assert preset.num_supernodes == 50 and specs[0].rounds == 500
        expected = {
            "paper-cifar10-pathological.toml": ("classes-per-client", 2),
            "paper-cifar100-pathological.toml": ("classes-per-client", 10),
            "paper-cifar10-dirichlet.toml": ("dirichlet-alpha", 0.1),
            "paper-cifar100-dirichlet.toml": ("dirichlet-alpha", 0.01),
        }[path.name]
        assert preset.run_config[expected[0]] == expected[1]
        return
    clients, rounds, models = CPU_PRESETS[path.name]
    assert preset.num_supernodes == clients and specs[0].rounds == rounds
    assert preset.run_config["models"] == models and preset.seeds == [42, 43]
    if path.name.startswith("quick-"):
        assert set(HETERO) <= set(preset.strategies)
    if path.name in ("quick-cifar10-cnn.toml", "cifar10-cnn-50clients.toml"):
        assert set(preset.strategies) == set(HETERO) | {"fedavg", "pfedhn"}


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.toml")), ids=str)
def test_run_config_files_load_through_the_schema(path):
    """conf/*.toml are what `flwr run --run-config FILE` takes: known keys only,
    every value valid, and each names a paper setting with 50 clients' 500 rounds."""
    data = tomllib.loads(path.read_text())
    cfg = load_run_config(data)
    assert cfg.num_server_rounds == 500 and cfg.dataset in ("cifar10", "cifar100")


#: The files of a run that the table needs, committed for long comparisons (README),
#: and the machine it ran on (absent from records that predate machine.json).
RECORD_FILES = {"config.json", "clients.json", "summary.json", "metrics.jsonl"}
RECORD_EXTRA = {"machine.json"}
RECORDS = sorted((ROOT / "docs" / "results").glob("*/runs/*"))


@pytest.mark.parametrize("run", RECORDS, ids=lambda p: p.name)
def test_committed_records_are_finished_runs_of_their_preset(run):
    """docs/results/<preset>/runs/<run>: a finished run of conf/compare/<preset>.toml.

    It fails when the preset or the run-config schema moves away from what the run
    used (the table would call the run stale), or when more than the record is
    committed (checkpoints, logs).
    """
    out = run.parents[1]
    preset = load_preset(ROOT / "conf" / "compare" / f"{out.name}.toml")
    (spec,) = [s for s in preset.runs() if s.name == run.name]
    assert (
        RECORD_FILES <= {p.name for p in run.iterdir()} <= RECORD_FILES | RECORD_EXTRA
    )
    found = report.inspect_run(out, preset, spec)
    assert found.status == report.FINISHED, found.reason
    assert len(found.curve) == spec.rounds


@pytest.mark.parametrize(
    ("preset_name", "heading", "recorded"),
    [
        ("quick-cifar10-5models", "## CIFAR-10, 10 clients with the paper's 5", None),
        ("quick-cifar10-cnn", "## CIFAR-10, 10 CNN clients", "mh-pfedhn"),
    ],
)
def test_the_quick_tables_in_the_docs_are_what_the_records_give(
    preset_name, heading, recorded
):
    """docs/COMPARISON.md's 10-client tables: every run of the preset (or of the
    one strategy ``recorded`` whose runs are committed) is recorded, and each
    strategy's accuracy cells are those ``make compare --table-only`` computes from
    the records (a record added or replaced without updating the docs fails)."""
    out = ROOT / "docs" / "results" / preset_name
    preset = load_preset(ROOT / "conf" / "compare" / f"{preset_name}.toml")
    specs = [s for s in preset.runs() if recorded in (None, s.strategy)]
    assert {p.name for p in (out / "runs").iterdir()} == {s.name for s in specs}
    table = published_section(heading)
    for s in report.build_report(out, preset, specs)["strategies"]:
        assert s["seeds_finished"] == s["seeds_total"] == 2, s["strategy"]
        row = (
            f"| `{s['strategy']}` | {report.format_accuracy(s['final_accuracy'])} "
            f"| {report.format_accuracy(s['best_accuracy'])} |"
        )
        assert row in table, f"docs/COMPARISON.md lacks the row {row}"


def published_section(heading: str) -> str:
    """docs/COMPARISON.md from ``heading`` to the next heading of its level or above."""
    docs = (ROOT / "docs" / "COMPARISON.md").read_text()
    start = docs.index(heading)
    ends = [docs.find(h, start + 1) for h in ("\n### ", "\n## ")]
    return docs[start : min([e for e in ends if e > 0] or [len(docs)])]


def accuracy_row(strategy: dict, *more: str) -> str:
    """A published row: the strategy, its final, best and last-5 mean accuracy as
    ``make compare --table-only`` formats them, then the cells ``more``."""
    cells = [
        f"`{strategy['strategy']}`",
        report.format_accuracy(strategy["final_accuracy"]),
        report.format_accuracy(strategy["best_accuracy"]),
        report.format_accuracy(strategy["last5_accuracy"]),
        *more,
    ]
    return "| " + " | ".join(cells) + " |"


def test_the_50_client_cnn_table_in_the_docs_is_what_the_records_give():
    """docs/COMPARISON.md's 50-client CNN table: every strategy finished both seeds,
    and its row is the one ``make compare --table-only`` computes from the records
    (final, best, last-5 mean)."""
    out = ROOT / "docs" / "results" / "cifar10-cnn-50clients"
    preset = load_preset(ROOT / "conf" / "compare" / "cifar10-cnn-50clients.toml")
    table = published_section("### All CNN, 100 rounds")
    strategies = report.build_report(out, preset, preset.runs())["strategies"]
    assert len(strategies) == 12
    for s in strategies:
        assert s["seeds_finished"] == s["seeds_total"] == 2, s["strategy"]
        row = accuracy_row(s, "42, 43")
        assert row in table, f"docs/COMPARISON.md lacks the row {row}"


def test_the_50_client_five_model_table_in_the_docs_is_what_the_records_give():
    """docs/COMPARISON.md's 50-client 5-model table, filled as runs finish: a
    strategy with a finished seed has the row ``make compare --table-only``
    computes from the records (final, best, last-5 mean, and final / best with
    recalibrated BatchNorm statistics) and its final accuracy per model, one
    without has none."""
    out = ROOT / "docs" / "results" / "cifar10-5models-50clients"
    preset = load_preset(ROOT / "conf" / "compare" / "cifar10-5models-50clients.toml")
    table = published_section("### The paper's 5 models, 60 rounds")
    recorded = 0
    for s in report.build_report(out, preset, preset.runs())["strategies"]:
        if not s["seeds_finished"]:
            assert f"| `{s['strategy']}` |" not in table, s["strategy"]
            continue
        recorded += 1
        assert s["final_recalibrated"] is not None, s["strategy"]
        seeds = ", ".join(str(r.seed) for r in s["runs"] if r.finished)
        row = accuracy_row(s, report.format_recalibrated(s), seeds)
        assert row in table, f"docs/COMPARISON.md lacks the row {row}"
        by_model = s["final_by_model"]
        assert list(by_model) == ["cnn", "vgg8", "resnet10", "resnet12", "resnet18"]
        cells = [report.format_accuracy(by_model[m]) for m in by_model]
        row = f"| `{s['strategy']}` | " + " | ".join(cells) + " |"
        assert row in table, f"docs/COMPARISON.md lacks the by-model row {row}"
    assert recorded >= 1


def test_cli_rejects_only_outside_the_preset(tmp_path, capsys):
    path = write_preset(tmp_path)
    assert compare.main([str(path), "--only", "local,fedproto", "--dry-run"]) == 2
    assert "--only 'local,fedproto': not in the preset's strategies (fedproto)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        compare.parse_args([str(path), "--seeds", "1,x"])


# --- hand-made results folders ---------------------------------------------


def fake_run(
    out: Path,
    name: str,
    accuracies: list[float],
    rounds: int | None = None,
    config: dict | None = None,
    train_clients: list[int] | None = None,
    bytes_down: int = 1000,
) -> Path:
    """A results folder as the ServerApp writes it (train phase only)."""
    path = out / "runs" / name
    path.mkdir(parents=True)
    strategy, seed = name.rsplit("-seed", 1)
    (path / "config.json").write_text(
        json.dumps({"strategy": strategy, "seed": int(seed), **(config or {})})
    )
    rows = []
    for i, acc in enumerate(accuracies, 1):
        clients = (train_clients or [3] * len(accuracies))[i - 1]
        rows.append(
            {
                "round": i,
                "phase": "train",
                "accuracy": acc,
                "accuracy_mean": acc,
                "loss": 1.0,
                "round_seconds": float(i),
                "server_seconds": 0.1,
                "client_message_cpu_seconds_sum": 10.0 * i,
                "server_process_cpu_seconds": 0.5,
                "bytes_down": bytes_down * i,
                "bytes_up": 500,
                "train_clients": clients,
            }
        )
    # A novel-client row must not count as a training round.
    rows.append({**rows[-1], "phase": "novel", "accuracy": 0.99})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows[:-1], key=lambda r: r["accuracy"])
    summary = {
        "rounds": rounds if rounds is not None else len(accuracies),
        "seconds": 10.0,
        "final_accuracy": accuracies[-1],
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


TRACEBACK = """\
INFO :      Starting Flower Simulation
\x1b[91mERROR \x1b[0m:     Simulation raised an exception
Traceback (most recent call last):
  File "/x/server_app/app.py", line 32, in main
    strategy.start(grid, results)
server_app.engine.registry.HandshakeError: handshake failed: node 7: Exception occurred.
Message: Dataset 'cifar10' not found in /data.
\x1b[91mERROR \x1b[0m:     Exit Code: 700
"""


def fail_run(out: Path, name: str, log: str = TRACEBACK, **state) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.log").write_text(log)
    status = {"started": "now", "pid": 1 << 30, "exit_code": 0, "timed_out": False}
    (out / "logs" / f"{name}.json").write_text(json.dumps(status | state))


@pytest.fixture
def hand_made(tmp_path):
    """3 strategies x 2 seeds, 3 rounds: two finished, one failed, one missing."""
    preset = load_preset(write_preset(tmp_path))
    out = tmp_path / "out"
    specs = preset.runs(results_dir=out / "runs")
    fake_run(out, "local-seed1", [0.2, 0.4, 0.5], train_clients=[3, 2, 3])
    fake_run(out, "local-seed2", [0.3, 0.6, 0.7])
    # local-seed2 started on one host and was resumed on another at round 2.
    host = {"cpus": 2, "cpu": "Xeon", "cpu_capability": "AVX512", "cuda": None}
    starts = [{"from_round": 0, **host}, {"from_round": 2, **host, "cpus": 4}]
    (out / "runs" / "local-seed2" / "machine.json").write_text(json.dumps(starts))
    fake_run(out, "mh-pfedhn-seed1", [0.5, 0.9, 0.8], bytes_down=3_000_000)
    fake_run(out, "mh-pfedhn-seed2", [0.4], rounds=1)
    fail_run(out, "mh-pfedhn-seed2")
    fail_run(out, "fedavg-seed1", log="something broke\n", timed_out=True, seconds=7)
    return out, preset, specs


def test_table_mean_std_bytes_and_failures(hand_made):
    out, preset, specs = hand_made
    result = report.write_outputs(out, preset, specs)
    local, fedavg, hn = result["strategies"]
    assert local["final_accuracy"]["mean"] == pytest.approx(0.6)
    assert local["final_accuracy"]["std"] == pytest.approx(0.1)  # population std
    assert local["best_accuracy"]["values"] == [0.5, 0.7]
    assert local["round_seconds"]["mean"] == pytest.approx(2.0)
    # CPU: clients' (10, 20, 30) plus the server process's 0.5, per round.
    assert local["cpu_seconds"]["mean"] == pytest.approx(20.5)
    # bytes per training client per round: seed 1 has 2 clients in round 2.
    seed1 = (1000 / 3 + 2000 / 2 + 3000 / 3) / 3
    seed2 = (1000 / 3 + 2000 / 3 + 3000 / 3) / 3
    assert local["bytes_down_per_client_round"]["values"] == pytest.approx(
        [seed1, seed2]
    )
    up = ((500 / 3 + 500 / 2 + 500 / 3) / 3 + 500 / 3) / 2
    assert local["bytes_up_per_client_round"]["mean"] == pytest.approx(up)
    assert (
        local["seeds_finished"],
        hn["seeds_finished"],
        fedavg["seeds_finished"],
    ) == (
        2,
        1,
        0,
    )
    assert hn["final_accuracy"]["mean"] == 0.8 and hn["best_accuracy"]["mean"] == 0.9

    md = (out / "comparison.md").read_text()
    down = (seed1 + seed2) / 2 / 1e6
    assert (
        f"| local | 60.00 ± 10.00 | 60.00 ± 10.00 | 45.00 ± 8.33 | – | 2.00 | 20.5 | "
        f"{down:.3f} | {up / 1e6:.3f} | 2/2 |  |" in md
    )
    # 3 MB x round / 3 clients, mean over rounds 1-3: 2 MB per client-round.
    assert (
        "| mh-pfedhn | 80.00 | 90.00 | 73.33 | – | 2.00 | 20.5 | 2.000 | 0.000 | 1/2 |"
        in md
    )
    assert (
        "seed 2 failed: after 1/3 rounds: HandshakeError: handshake failed: node 7: "
        "Exception occurred. Message: Dataset 'cifar10' not found in /data." in md
    )
    assert "seed 1 failed: timed out after 7 s before round 1: something broke" in md
    assert "seed 2 not run" in md
    assert "| 0/2 |" in md
    assert (
        "| mh-pfedhn-seed1 | finished | 80.00 | 90.00 @ 2 | 3/3 | 2.00 | 20.5 |" in md
    )
    # The machine column: "–" for a record without machine.json.
    assert "| 2.000 / 0.000 | – | runs/mh-pfedhn-seed1 |" in md
    assert (
        "| 2 CPUs, Xeon (AVX512); then 4 CPUs, Xeon (AVX512) | runs/local-seed2 |" in md
    )

    data = json.loads((out / "comparison.json").read_text())
    runs = {r["name"]: r for s in data["strategies"] for r in s["runs"]}
    assert runs["local-seed1"]["path"] == str(out / "runs" / "local-seed1")
    assert runs["mh-pfedhn-seed2"]["log"] == str(out / "logs" / "mh-pfedhn-seed2.log")
    assert runs["fedavg-seed2"]["status"] == "not run"
    assert data["strategies"][0]["final_accuracy"]["mean"] == pytest.approx(0.6)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statuses_decide_what_is_skipped(hand_made):
    out, preset, specs = hand_made
    by_name = {s.name: s for s in specs}

    def status(name):
        return report.inspect_run(out, preset, by_name[name]).status

    assert status("local-seed1") == "finished"
    assert status("mh-pfedhn-seed2") == "failed"
    assert status("local-seed2") == "finished"
    # Same rounds but another setting than the preset: stale, runs again.
    fake_run(out, "fedavg-seed2", [0.1, 0.2, 0.3], config={"client-lr": 0.5})
    stale = report.inspect_run(out, preset, by_name["fedavg-seed2"])
    assert stale.status == "stale" and "client-lr = 0.5 (preset: 0.01)" in stale.reason
    # A run another live process is running is left alone.
    (out / "logs" / "fedavg-seed1.json").write_text(json.dumps({"pid": os.getpid()}))
    assert status("fedavg-seed1") == "running"
    (out / "logs" / "fedavg-seed1.json").write_text(json.dumps({"pid": 1 << 30}))
    assert report.inspect_run(out, preset, by_name["fedavg-seed1"]).describe() == (
        "failed: interrupted before round 1"
    )


class FakeRunner:
    """Stands in for compare.Runner: "runs" a spec by writing a finished folder."""

    ran: list[str] = []

    def __init__(self, out, preset, timeout):
        self.out = out

    def run(self, spec):
        FakeRunner.ran.append(spec.name)
        config = {k: v for k, v in spec.run_config.items() if k != "results-dir"}
        accs = [0.1 * (i + 1) for i in range(spec.rounds)]
        fake_run(self.out, spec.name, accs, config=config)
        fail_run(self.out, spec.name, log="ok\n")

    def stop(self):
        pass


def test_rerun_skips_finished_and_sets_old_attempts_aside(
    hand_made, monkeypatch, capsys
):
    out, preset, _ = hand_made
    FakeRunner.ran = []
    monkeypatch.setattr(compare, "Runner", FakeRunner)
    argv = [str(preset.path), "--out", str(out)]
    assert compare.main([*argv, "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "skip local-seed1: finished (3 rounds)" in listed
    assert "run  mh-pfedhn-seed2: failed: after 1/3 rounds" in listed
    assert FakeRunner.ran == []

    assert compare.main([*argv, "--only", "mh-pfedhn,fedavg"]) == 0
    assert FakeRunner.ran == ["fedavg-seed1", "fedavg-seed2", "mh-pfedhn-seed2"]
    attic = list((out / "attic").iterdir())
    assert sorted(p.name.rsplit("-", 2)[0] for p in attic) == [
        "fedavg-seed1",
        "mh-pfedhn-seed2",
    ]
    assert any((p / "mh-pfedhn-seed2" / "summary.json").is_file() for p in attic)
    md = (out / "comparison.md").read_text()
    assert md.count("| 2/2 |") == 3  # the table still shows every strategy

    FakeRunner.ran = []
    assert compare.main(argv) == 0
    assert FakeRunner.ran == []  # everything finished: nothing runs

    assert compare.main([*argv, "--seeds", "5", "--table-only"]) == 0
    assert FakeRunner.ran == []
    assert "| local | – | – | – | – | – | – | – | – | 0/1 | seed 5 not run |" in (
        (out / "comparison.md").read_text()
    )


def test_only_a_compatible_checkpoint_with_client_state_in_the_run_resumes(
    tmp_path, capsys
):
    """An unfinished run resumes from its checkpoint only when the run config can
    continue it and its clients kept their state in the run's folder."""
    from tests.helpers import run, write_learnable_imagefolder

    data = write_learnable_imagefolder(tmp_path / "data", 3, 6)
    text = """
[compare]
strategies = ["local"]
seeds = [1]
num-supernodes = 2

[run-config]
dataset = "imagefolder"
num-server-rounds = 3
"""
    out = tmp_path / "out"
    (spec,) = load_preset(write_preset(tmp_path, text)).runs(
        results_dir=out / "runs", data_dir=data
    )
    assert compare.resumable(out, spec) is None  # no checkpoint yet
    two_rounds = spec.run_config | {"num-server-rounds": 2}
    run({k: v for k, v in two_rounds.items() if k != "client-state-dir"}, 2)
    assert compare.resumable(out, spec) is None
    assert "its clients did not keep their state" in capsys.readouterr().out

    shutil.rmtree(out / "runs" / spec.name)
    run(two_rounds, 2)
    resumed, after = compare.resumable(out, spec)
    assert after == 2
    assert resumed.run_config == spec.run_config | {
        "resume-from": str(out / "runs" / spec.name / "checkpoint.pt")
    }
    other = RunSpec(spec.strategy, spec.seed, spec.run_config | {"batch-size": 7})
    assert compare.resumable(out, other) is None
    assert "incompatible run config: batch-size" in capsys.readouterr().out


def test_failure_reason_from_log_tail():
    assert report.failure_reason(TRACEBACK).startswith(
        "HandshakeError: handshake failed: node 7"
    )
    assert report.failure_reason("INFO : x\nERROR :  Exit Code: 700\n") == (
        "Exit Code: 700"
    )
    log = "ERROR :  ClientApp crashed: out of memory\nERROR :  Exit Code: 700\n"
    assert report.failure_reason(log) == "ClientApp crashed: out of memory"
    assert report.failure_reason("\n") == "no output"
    assert report.failure_reason("INFO : started\n", last_line=False) == ""
    assert len(report.failure_reason("ValueError: " + "x" * 1000)) == 240


# --- one real comparison ------------------------------------------------------


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.e2e
def test_tiny_comparison_through_flwr_run(tmp_path, capsys):
    from tests.helpers import write_learnable_imagefolder

    data = write_learnable_imagefolder(tmp_path / "data", 10, 12)
    preset = write_preset(
        tmp_path,
        """
[compare]
title = "tiny"
strategies = ["local", "mh-pfedhn"]
seeds = [1]
num-supernodes = 2
timeout = 300

[run-config]
dataset = "imagefolder"
num-server-rounds = 2
batch-size = 16
""",
    )
    out = tmp_path / "out"
    code = compare.main([str(preset), "--out", str(out), "--data-dir", str(data)])
    printed = capsys.readouterr().out
    md = (out / "comparison.md").read_text()
    assert code == 0, md + printed[-3000:]
    assert "| local | " in md and "| mh-pfedhn | " in md
    assert md.count("| 1/1 |") == 2, md
    assert (out / "comparison.png").stat().st_size > 0
    summary = json.loads(
        (out / "runs" / "mh-pfedhn-seed1" / "summary.json").read_text()
    )
    assert summary["rounds"] == 2
    data_json = json.loads((out / "comparison.json").read_text())
    hn = data_json["strategies"][1]
    assert hn["bytes_down_per_client_round"]["mean"] > 0
    assert hn["cpu_seconds"]["mean"] > 0
    (start,) = json.loads((out / "runs" / "local-seed1" / "machine.json").read_text())
    assert start["from_round"] == 0 and start["cpus"] >= 1
    assert f"| {describe_machine(start)} | runs/local-seed1 |" in md
    # The SuperLink and everything it started are gone.
    config = (out / "superlink" / "flwr-home" / "config.toml").read_text()
    address = config.split('address = "', 1)[1].split('"', 1)[0]
    if Path("/proc").is_dir():
        assert _processes_mentioning(address) == []

    # One round more: the run resumes from its round-2 checkpoint, and its
    # clients (new processes) take their personal models from client-state/.
    preset.write_text(preset.read_text().replace("rounds = 2", "rounds = 3"))
    argv = [str(preset), "--out", str(out), "--data-dir", str(data)]
    assert compare.main([*argv, "--only", "local"]) == 0
    assert "local-seed1 -> " in (printed := capsys.readouterr().out)
    assert "(resumes after round 2)" in printed
    run = out / "runs" / "local-seed1"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rows}) == [1, 2, 3]
    for name, saved_after in (("client-0.npz", 3), ("client-0.checkpointed.npz", 2)):
        header, records = persist.load_state(run / "client-state" / name)
        assert header["round"] == saved_after and "model-params" in records
    log = (out / "logs" / "local-seed1.log").read_text()
    assert (
        "'client-0': restored 1 state record(s) (model-params) saved after round 2"
        in log
    )


def test_table_reads_the_recalibrated_accuracy_when_every_round_has_it(tmp_path):
    preset = load_preset(write_preset(tmp_path))
    out = tmp_path / "out"
    specs = preset.runs(seeds=[1], strategies=["local"])
    path = fake_run(out, "local-seed1", [0.2, 0.4, 0.5])
    text = (path / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    for row, recalibrated in zip(rows, [0.6, 0.9, 0.8, 0.1], strict=True):
        row["accuracy_recalibrated"] = recalibrated
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = report.markdown(report.build_report(out, preset, specs))
    assert "| local | 50.00 | 50.00 | 36.67 | 80.00 / 90.00 |" in md


def with_clients(
    path: Path, tests: list[int], last: list[float], names: list[str] | None = None
) -> None:
    """Give a hand-made run clients ``names`` (default ``client-<i>``) with
    ``tests[i]`` test examples and, in its last round, accuracy ``last[i]``."""
    names = names or [f"client-{i}" for i in range(len(tests))]
    clients = [{"name": n, "num_test": t} for n, t in zip(names, tests, strict=True)]
    (path / "clients.json").write_text(json.dumps(clients))
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["client_accuracy"] = dict(zip(names, last, strict=True))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_gives_each_architectures_final_accuracy(tmp_path):
    """With several models the table adds each one's final accuracy: its clients'
    correct answers over their test examples, clients assigned in contiguous
    blocks (5 clients, 2 models: clients 0-2 the first, 3-4 the second)."""
    text = PRESET.replace('models = "cnn"', 'models = "cnn,resnet10"').replace(
        '"fedavg", ', ""
    )
    preset = load_preset(write_preset(tmp_path, text))
    out = tmp_path / "out"
    specs = preset.runs(seeds=[1, 2], strategies=["local"])
    for seed, last in ((1, [1.0, 0.5, 0.0, 0.25, 1.0]), (2, [0.5] * 5)):
        path = fake_run(out, f"local-seed{seed}", [0.2, 0.5, 0.6],
                        config={"models": "cnn,resnet10"})  # fmt: skip
        with_clients(path, [10, 20, 30, 40, 40], last)
    found = report.inspect_run(out, preset, specs[0])
    # cnn: (10 + 10 + 0) / 60; resnet10: (10 + 40) / 80
    assert found.final_by_model == pytest.approx({"cnn": 1 / 3, "resnet10": 0.625})
    md = report.markdown(report.build_report(out, preset, specs))
    assert "| strategy | cnn | resnet10 |" in md
    assert "| local | 41.67 ± 8.33 | 56.25 ± 6.25 |" in md


@pytest.mark.parametrize(
    ("models", "names"),
    [("cnn", ["client-0", "client-1"]), ("cnn,vgg8", ["client-0", "site-b"])],
)
def test_no_accuracy_by_model_with_one_model_or_names_of_a_deployment(
    tmp_path, models, names
):
    path = fake_run(tmp_path, "local-seed1", [0.5], config={"models": models})
    with_clients(path, [10, 10], [0.5, 0.5], names)
    row = json.loads((path / "metrics.jsonl").read_text().splitlines()[0])
    assert report.accuracy_by_model(path, row) is None


@pytest.mark.parametrize(
    ("preset_name", "label"),
    [
        ("quick-cifar10-5models", '`hn-order = "random"` (the default)'),
        ("cifar10-5models-by-size", '`hn-order = "by-size"`'),
        ("cifar10-5models-hn-window3", "`hn-window = 3`"),
        ("quick-cifar10-cnn", "`hn-window = 2` (the default)"),
        ("cifar10-cnn-hn-window3", "`hn-window = 3`"),
        ("quick-cifar10-5models", '`client-precision = "fp32"` (the default)'),
        ("cifar10-5models-bf16", '`client-precision = "bf16"`'),
    ],
)
def test_the_option_tables_in_the_docs_are_what_the_records_give(preset_name, label):
    """docs/COMPARISON.md's rows for ``mh-pfedhn``'s options (round order, window,
    arithmetic) on the 10-client settings, the default's and the presets that
    change them, are those of their records."""
    out = ROOT / "docs" / "results" / preset_name
    preset = load_preset(ROOT / "conf" / "compare" / f"{preset_name}.toml")
    docs = (ROOT / "docs" / "COMPARISON.md").read_text()
    finished = [
        found
        for found in (
            report.inspect_run(out, preset, s)
            for s in preset.runs()
            if s.strategy == "mh-pfedhn"
        )
        if found.status == report.FINISHED
    ]
    assert finished
    for found in finished:
        row = (
            f"| {label} | {found.seed} "
            f"| {100 * found.final_accuracy:.2f} "
            f"| {100 * found.best_accuracy:.2f} @ {found.best_round} "
            f"| {100 * found.last5_accuracy:.2f} |"
        )
        assert row in docs, f"docs/COMPARISON.md lacks the row {row}"
