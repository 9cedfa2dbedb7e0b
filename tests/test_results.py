"""The run's results folder for people: metrics.csv, TensorBoard events, the plot,
disk use, and the per-round progress lines (fast)."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.ticker import MaxNLocator

from common.config import load_run_config
from server_app.results import CSV_COLUMNS, RunResults, format_duration
from tools import report

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


def config(tmp_path: Path, **extra) -> dict:
    return {
        "results-dir": str(tmp_path),
        "run-name": "run",
        "strategy": "mh-pfedhn",
        "dataset": "cifar10",
        "models": "cnn,vgg8",
        **extra,
    }


def row(rnd: int, acc: float, phase: str = "train", **extra) -> dict:
    clients = {"client-2": acc - 0.1, "client-10": acc + 0.1, "client-1": acc}
    return {
        "round": rnd,
        "phase": phase,
        "accuracy": acc,
        "accuracy_mean": acc,
        "loss": 1.0 / rnd,
        "client_accuracy": clients,
        "eval_clients": 3,
        "train_loss": 2.0 / rnd,
        "round_seconds": 1.5,
        "server_seconds": 0.25,
        "bytes_down": 1000 * rnd,
        "bytes_up": 500,
        **extra,
    }


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (path / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(path))
    events.Reload()
    return {
        tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]  # float32
        for tag in events.Tags()["scalars"]
    }


def test_metrics_csv_has_a_row_per_round_and_a_column_per_client(tmp_path):
    results = RunResults.create(load_run_config(config(tmp_path)))
    rows = [row(1, 0.3), row(2, 0.5, loss=float("nan"), accuracy_recalibrated=0.6)]
    novel = row(2, 0.2, phase="novel", client_accuracy={"client-3": 0.2})
    del novel["train_loss"]
    for r in [*rows, novel]:
        results.append(r)

    columns, lines = read_csv(results.path)
    assert tuple(columns[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    # Every other scalar field once, in first-seen order; a later row may add one.
    assert columns[len(CSV_COLUMNS) :] == [
        "eval_clients",
        "train_loss",
        "server_seconds",
        "accuracy_recalibrated",
        "accuracy[client-1]",
        "accuracy[client-2]",
        "accuracy[client-3]",
        "accuracy[client-10]",
    ]
    assert [(x["round"], x["phase"]) for x in lines] == [
        ("1", "train"),
        ("2", "train"),
        ("2", "novel"),
    ]
    assert float(lines[0]["accuracy"]) == 0.3 and lines[0]["bytes_down"] == "1000"
    assert float(lines[0]["accuracy[client-10]"]) == pytest.approx(0.4)
    # Missing values and NaN are empty cells.
    assert lines[1]["loss"] == "" and lines[0]["accuracy_recalibrated"] == ""
    assert lines[2]["train_loss"] == "" and lines[2]["accuracy[client-1]"] == ""
    assert float(lines[2]["accuracy[client-3]"]) == 0.2
    # metrics.jsonl keeps its format: the records, one JSON object a line.
    jsonl = (results.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in jsonl] == [1, 2, 2]
    assert json.loads(jsonl[0]) == rows[0]
    assert math.isnan(json.loads(jsonl[1])["loss"])
    results.finish()


def test_tensorboard_scalars_per_round(tmp_path):
    results = RunResults.create(load_run_config(config(tmp_path)))
    # Opened with the folder, before round 1 (its import costs no round time).
    assert len(list(results.path.glob("events.out.tfevents.*"))) == 1
    for r in [row(1, 0.3), row(2, 0.5), row(2, 0.2, phase="novel")]:
        results.append(r)
    # Flushed per round: readable while the run goes on.
    assert scalars(results.path)["accuracy/total"] == [(1, 0.3), (2, 0.5)]
    results.finish()

    found = scalars(results.path)
    assert {
        "accuracy/total",
        "accuracy/client_mean",
        "loss/test",
        "loss/train",
        "bytes/down",
        "bytes/up",
        "seconds/round",
        "seconds/server",
        "client_accuracy/client-1",
        "client_accuracy/client-10",
        "novel_accuracy/total",
        "novel_client_accuracy/client-2",
    } <= set(found)
    assert found["bytes/down"] == [(1, 1000.0), (2, 2000.0)]
    assert found["seconds/round"] == [(1, 1.5), (2, 1.5)]
    assert found["loss/train"] == [(1, 2.0), (2, 1.0)]
    assert [s for s, _ in found["client_accuracy/client-10"]] == [1, 2]
    assert found["client_accuracy/client-10"][0][1] == 0.4
    assert found["novel_accuracy/total"] == [(2, 0.2)]
    assert len(list(results.path.glob("events.out.tfevents.*"))) == 1


def test_a_resumed_run_rewrites_the_csv_and_hides_recomputed_rounds(tmp_path):
    cfg = load_run_config(config(tmp_path))
    first = RunResults.create(cfg)
    for rnd in (1, 2, 3):
        first.append(row(rnd, 0.1 * rnd))
    first.finish()
    # A checkpoint of round 2 that holds round 1's row (round 2's evaluation
    # was still waiting for round 3's messages).
    resumed = RunResults.reopen(first.path, cfg, [row(1, 0.1)], from_round=2)
    assert [x["round"] for x in read_csv(first.path)[1]] == ["1"]
    resumed.append(row(2, 0.7))
    resumed.append(row(3, 0.8))
    resumed.finish()
    assert [(x["round"], x["accuracy"]) for x in read_csv(first.path)[1]] == [
        ("1", "0.1"),
        ("2", "0.7"),
        ("3", "0.8"),
    ]
    found = scalars(first.path)
    assert found["accuracy/total"] == [(1, 0.1), (2, 0.7), (3, 0.8)]
    assert [s for s, _ in found["client_accuracy/client-1"]] == [1, 2, 3]


def test_without_tensorboard_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        results = RunResults.create(load_run_config(config(tmp_path)))
        results.append(row(1, 0.3))
        results.append(row(2, 0.4))
    warnings = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(warnings) == 1  # once per run, not per round
    assert len(read_csv(results.path)[1]) == 2
    assert not list(results.path.glob("events.out.tfevents.*"))
    assert results.finish()["rounds"] == 2


def test_plot_title_and_integer_round_ticks(tmp_path):
    cfg = load_run_config(
        config(tmp_path, **{"run-name": "", "partition": "dirichlet"})
    )
    results = RunResults.create(cfg)
    results.write_clients([{"name": f"client-{i}", "novel": i == 4} for i in range(5)])
    for rnd in (1, 2, 3):
        results.append(row(rnd, 0.2 * rnd))
    fig = results.figure()
    ax = fig.axes[0]
    title = ax.get_title().replace("\n", " ")
    assert title == (
        "mh-pfedhn on cifar10 (dirichlet), 5 clients (1 novel), models: cnn, vgg8"
    )
    assert results.path.name not in title  # the timestamped run name
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_xlabel() == "round"
    results.finish()
    assert (results.path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_title_without_clients_json(tmp_path):
    results = RunResults(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"strategy": "fedavg"}))
    results.records = [row(1, 0.5)]
    assert results.title() == "fedavg on ?, 3 clients, models: ?"


def test_comparison_plot_title_and_ticks():
    run = SimpleNamespace(finished=True, curve=[(1, 0.2), (2, 0.4), (3, 0.5)])
    fig = report.figure(
        {
            "title": "CIFAR-10, 2 models",
            "run_config": {"dataset": "cifar10", "models": "cnn,vgg8"},
            "num_supernodes": 10,
            "strategies": [
                {"strategy": "local", "runs": [run]},
                {"strategy": "mh-pfedhn", "runs": [run]},
            ],
        }
    )
    ax = fig.axes[0]
    assert ax.get_title().splitlines() == [
        "CIFAR-10, 2 models",
        "local, mh-pfedhn on cifar10 (pathological), 10 clients, models: cnn, vgg8",
    ]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    assert all(float(t).is_integer() for t in ax.get_xticks() if low <= t <= high)


def test_disk_usage(tmp_path):
    results = RunResults(tmp_path)
    assert results.describe_disk_usage() == "run folder 0 B, no checkpoint.pt"
    (tmp_path / "checkpoint.pt").write_bytes(b"x" * 3_000_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"x" * 500_000)
    assert results.disk_usage() == {"run_bytes": 3_500_000, "checkpoint_bytes": 3e6}
    assert results.describe_disk_usage() == (
        "run folder 3.5 MB, of which checkpoint.pt 3.0 MB"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (42, "42s"), (425, "7m 05s"), (3 * 3600 + 12 * 60 + 5, "3h 12m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_lines_appear_as_soon_as_the_numbers_exist(tmp_path, caplog):
    """The carried evaluation: round 1's accuracy comes with round 2's messages,
    so round 1's line (loss, seconds, ETA) is logged when round 1 ends and its
    accuracy as soon as round 2's replies are in, before round 2's own line."""
    from tests.helpers import base_config, run, write_learnable_imagefolder

    folder = write_learnable_imagefolder(tmp_path / "data", 4, 12)
    with caplog.at_level(logging.INFO, logger="flwr"):
        extra = {"num-server-rounds": 2, "checkpoint-every": 0}
        run(base_config(folder, tmp_path, **extra), 2)
    lines = [
        r.getMessage()
        for r in caplog.records
        if re.match(r"round \d+/\d+ \|", r.getMessage())
    ]
    assert len(lines) == 3, lines
    assert lines[0].startswith("round 1/2 | acc pending (with round 2) | train loss ")
    assert " s | ETA " in lines[0]
    assert lines[1].startswith("round 1/2 | acc ") and "| test loss " in lines[1]
    assert lines[2].startswith("round 2/2 | acc ") and "| ETA 0s | down " in lines[2]
