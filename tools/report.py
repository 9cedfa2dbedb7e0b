"""Comparison table and plot, built from the results folders of finished runs.

Layout of a comparison folder ``<out>/``:

``runs/<strategy>-seed<seed>/``
    Each run's standard results folder (``config.json``, ``metrics.jsonl``,
    ``summary.json``, ... see :mod:`server_app.results`).
``logs/<strategy>-seed<seed>.log`` and ``.json``
    The output of its ``flwr run``; when and by which process it started and
    how it ended (exit code, seconds, whether it timed out).
``comparison.md``, ``comparison.json``, ``comparison.png``
    Per strategy: final, best and last-5-mean accuracy (and, with ``bn-eval =
    "both"``, final and best with recalibrated BatchNorm statistics; mean ± std
    over the seeds that finished), seconds per round, array bytes per training
    client per round (down and up) and the number of finished seeds; with
    several architectures, the final accuracy of each; per run also the machine
    it ran on (its ``machine.json``); the mean accuracy curves.

Everything here reads files only, so ``--table-only`` rebuilds the outputs from
whatever runs exist, also while others are still running.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client_app.local import assign_model
from common.config import ConfigError, load_run_config
from tools.machine import describe as describe_machine

from .preset import Preset, RunSpec

FINISHED, RUNNING, FAILED, INCOMPLETE, STALE, NOT_RUN = (
    "finished",
    "running",
    "failed",
    "incomplete",
    "stale",
    "not run",
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The last line of a Python traceback: ``package.module.SomeError: message``.
EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))"
    r"(?::\s*(.*))?$"
)
REASON_CHARS = 240
#: Evaluations averaged for the "last 5" reading (the end of a noisy curve).
LAST = 5
#: The per-round accuracy with BatchNorm statistics recomputed (``bn-eval = both``).
RECAL = "accuracy_recalibrated"
#: A simulated client's name: ``client-<partition-id>``.
SIMULATED_NAME = re.compile(r"client-(\d+)")


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def log_path(out: Path, name: str) -> Path:
    return out / "logs" / f"{name}.log"


def status_path(out: Path, name: str) -> Path:
    return out / "logs" / f"{name}.json"


@dataclass
class RunReport:
    """What one run's files say: its status and, once finished, its numbers."""

    strategy: str
    seed: int
    name: str
    status: str
    reason: str = ""
    path: str = ""
    log: str = ""
    rounds: int = 0
    expected_rounds: int = 0
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    best_round: int | None = None
    last5_accuracy: float | None = None
    final_recalibrated: float | None = None
    best_recalibrated: float | None = None
    round_seconds: float | None = None
    cpu_seconds: float | None = None
    bytes_down_per_client: float | None = None
    bytes_up_per_client: float | None = None
    final_by_model: dict[str, float] | None = None
    machine: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def describe(self) -> str:
        """``finished`` or e.g. ``failed: <reason>`` (one line)."""
        return f"{self.status}: {self.reason}" if self.reason else self.status


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if row.get("phase", "train") == "train":
            rows.append(row)
    return rows


def accuracy_by_model(path: Path, row: dict[str, Any]) -> dict[str, float] | None:
    """Per architecture of the run's ``models``, in that order: total correct /
    total test examples of its clients in ``row`` (one round's record; the stored
    BatchNorm reading).

    A simulated client ``client-<i>`` runs the model the app assigns to partition
    ``i`` (contiguous blocks); ``None`` with one architecture, or when a client's
    name or test count is not in the run's files (a deployment's own names).
    """
    config = _read_json(path / "config.json") or {}
    models = str(config.get("models", "")).split(",")
    clients = _read_json(path / "clients.json")
    accuracy = row.get("client_accuracy")
    if len(set(models)) < 2 or not isinstance(clients, list) or not accuracy:
        return None
    tests = {c["name"]: c["num_test"] for c in clients}
    correct = dict.fromkeys(models, 0.0)
    examples = dict.fromkeys(models, 0)
    for name, acc in accuracy.items():
        match = SIMULATED_NAME.fullmatch(name)
        if match is None or name not in tests:
            return None
        model = assign_model(int(match.group(1)), len(tests), models)
        correct[model] += acc * tests[name]
        examples[model] += tests[name]
    return {m: correct[m] / n for m, n in examples.items() if n}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def machine_label(path: Path) -> str:
    """The host(s) a run was computed on, from its ``machine.json``; ``""`` if absent.

    A run resumed on other hardware lists each host once, in order
    (``A; then B``).
    """
    starts = _read_json(path / "machine.json")
    if not isinstance(starts, list):
        return ""
    labels = [describe_machine(s) for s in starts if isinstance(s, dict)]
    return "; then ".join(dict.fromkeys(labels))


def per_client_bytes(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean over rounds of ``key`` (bytes_down / bytes_up) per training client."""
    return _mean(
        [
            r[key] / r["train_clients"]
            for r in rows
            if r.get("train_clients") and key in r
        ]
    )


#: The per-round fields whose sum is a round's CPU cost (:func:`cpu_seconds`).
CPU_FIELDS = ("client_message_cpu_seconds_sum", "server_process_cpu_seconds")


def cpu_seconds(rows: list[dict[str, Any]]) -> float | None:
    """Mean over rounds of the CPU time the round cost: what the clients spent
    handling their messages whole (``client_message_cpu_seconds_sum``: loops,
    prototype passes, compression, state) plus the server process's
    (``server_process_cpu_seconds``).

    Unlike ``round_seconds`` (wall clock), this barely moves with what else the
    machine runs, so runs measured in different sessions compare on it. None
    when the rows predate these fields (``client_cpu_seconds_sum`` alone covers
    only the training and evaluation loops, so it would undercount strategies
    that work outside them).
    """
    return _mean(
        [sum(r[k] for k in CPU_FIELDS) for r in rows if all(k in r for k in CPU_FIELDS)]
    )


def failure_reason(log: str, last_line: bool = True) -> str:
    """The most telling line of a failed run's output (its last exception).

    ``flwr run`` exits 0 even when the ServerApp raised, so a failure is found
    from the results folder and explained from the log: the last traceback's
    exception line (with its continuation lines), else the last ``ERROR`` line,
    else (with ``last_line``) the last line, else ``""``.
    """
    lines = [ANSI.sub("", line).rstrip() for line in log.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = EXCEPTION_LINE.match(lines[i])
        if match is None:
            continue
        text = match.group(1) + (f": {match.group(2)}" if match.group(2) else "")
        for extra in lines[i + 1 : i + 8]:
            if not extra.strip() or extra.startswith(("ERROR", "INFO", "WARNING")):
                break
            text += " " + extra.strip()
        return _shorten(text)
    errors = [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.startswith("ERROR") and ":" in line
    ]
    useful = [e for e in errors if e and not e.startswith("Exit Code")]
    if useful or errors:
        return _shorten((useful or errors)[-1])
    rest = [line.strip() for line in lines if line.strip()]
    if not last_line:
        return ""
    return _shorten(rest[-1]) if rest else "no output"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _config_differences(run: Path, expected: dict[str, Any]) -> list[str]:
    config = _read_json(run / "config.json") or {}
    return [
        f"{k} = {config[k]!r} (preset: {v!r})"
        for k, v in expected.items()
        if k in config and config[k] != v
    ]


def inspect_run(out: Path, preset: Preset, spec: RunSpec) -> RunReport:
    """Status and numbers of one run from its files under ``out``."""
    path, log = run_dir(out, spec.name), log_path(out, spec.name)
    report = RunReport(
        strategy=spec.strategy,
        seed=spec.seed,
        name=spec.name,
        status=NOT_RUN,
        path=str(path.relative_to(out)) if path.exists() else "",
        log=str(log.relative_to(out)) if log.is_file() else "",
        expected_rounds=spec.rounds,
    )
    summary = _read_json(path / "summary.json")
    rows = _train_rows(path / "metrics.jsonl")
    report.rounds = (
        int(summary["rounds"])
        if summary
        else max((r["round"] for r in rows), default=0)
    )
    if summary is not None and report.rounds == spec.rounds:
        changed = _config_differences(path, preset.expected_config(spec))
        if changed:
            report.status = STALE
            report.reason = "config differs from the preset: " + "; ".join(changed)
            return report
        report.status = FINISHED
        report.final_accuracy = summary.get("final_accuracy")
        report.best_accuracy = summary.get("best_accuracy")
        report.best_round = summary.get("best_round")
        report.last5_accuracy = _mean([r["accuracy"] for r in rows[-LAST:]])
        recalibrated = [r["accuracy_recalibrated"] for r in rows if RECAL in r]
        if len(recalibrated) == len(rows):
            report.final_recalibrated = recalibrated[-1]
            report.best_recalibrated = max(recalibrated)
        report.round_seconds = _mean([r["round_seconds"] for r in rows])
        report.cpu_seconds = cpu_seconds(rows)
        report.bytes_down_per_client = per_client_bytes(rows, "bytes_down")
        report.bytes_up_per_client = per_client_bytes(rows, "bytes_up")
        report.curve = [(int(r["round"]), float(r["accuracy"])) for r in rows]
        report.final_by_model = accuracy_by_model(path, rows[-1]) if rows else None
        report.machine = machine_label(path)
        return report
    ended = _read_json(status_path(out, spec.name))
    if ended is None and not log.is_file():
        if path.exists():
            report.status = INCOMPLETE
            report.reason = f"{report.rounds}/{spec.rounds} rounds, no log"
        return report
    if ended is not None and "exit_code" not in ended and _alive(ended.get("pid")):
        report.status = RUNNING
        report.reason = f"{report.rounds}/{spec.rounds} rounds so far"
        return report
    report.status = FAILED
    text = log.read_text(errors="replace") if log.is_file() else ""
    parts = []
    interrupted = False
    if ended is not None and ended.get("timed_out"):
        parts.append(f"timed out after {ended.get('seconds', 0):.0f} s")
    elif ended is None or "exit_code" not in ended or ended.get("interrupted"):
        parts.append("interrupted")
        interrupted = True
    if report.rounds:
        parts.append(f"after {report.rounds}/{spec.rounds} rounds")
    else:
        parts.append("before round 1")
    if text.strip():
        reason = failure_reason(text, last_line=not interrupted)
    else:
        reason = "" if interrupted else "no log"
    report.reason = " ".join(parts) + (": " + reason if reason else "")
    return report


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stats(values: list[float | None]) -> dict[str, Any] | None:
    """Mean, std (population, ddof 0), min, max and the values; None if empty."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {
        "mean": mean,
        "std": std,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def by_model(runs: list[RunReport]) -> dict[str, dict[str, Any]]:
    """Per architecture, :func:`stats` of the runs' final accuracy on it (the
    runs that have it; ``{}`` if none does)."""
    models = [m for r in runs for m in r.final_by_model or {}]
    return {
        m: stats([(r.final_by_model or {}).get(m) for r in runs])
        for m in dict.fromkeys(models)
    }


def build_report(out: Path, preset: Preset, specs: list[RunSpec]) -> dict[str, Any]:
    """Per strategy (in preset order) the aggregated numbers and per-run status."""
    runs = [inspect_run(out, preset, spec) for spec in specs]
    strategies = []
    for strategy in dict.fromkeys(spec.strategy for spec in specs):
        own = [r for r in runs if r.strategy == strategy]
        done = [r for r in own if r.finished]
        strategies.append(
            {
                "strategy": strategy,
                "seeds_finished": len(done),
                "seeds_total": len(own),
                "final_accuracy": stats([r.final_accuracy for r in done]),
                "best_accuracy": stats([r.best_accuracy for r in done]),
                "last5_accuracy": stats([r.last5_accuracy for r in done]),
                "final_recalibrated": stats([r.final_recalibrated for r in done]),
                "best_recalibrated": stats([r.best_recalibrated for r in done]),
                "round_seconds": stats([r.round_seconds for r in done]),
                "cpu_seconds": stats([r.cpu_seconds for r in done]),
                "bytes_down_per_client_round": stats(
                    [r.bytes_down_per_client for r in done]
                ),
                "bytes_up_per_client_round": stats(
                    [r.bytes_up_per_client for r in done]
                ),
                "final_by_model": by_model(done),
                "runs": own,
            }
        )
    rounds = specs[0].rounds if specs else 0
    return {
        "preset": str(preset.path),
        "name": preset.name,
        "title": preset.title or preset.name,
        "out": str(out),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "num_supernodes": preset.num_supernodes,
        "rounds": rounds,
        "seeds": list(dict.fromkeys(spec.seed for spec in specs)),
        "run_config": preset.run_config,
        "strategy_config": preset.strategy_config,
        "strategies": strategies,
    }


def format_accuracy(stat: dict[str, Any] | None) -> str:
    """An accuracy statistic as the table prints it: ``mean`` or ``mean ± std`` (%)."""
    if stat is None:
        return "–"
    if len(stat["values"]) == 1:
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def format_recalibrated(strategy: dict[str, Any]) -> str:
    """``final / best`` evaluated with recomputed BatchNorm statistics, or ``–``."""
    final, best = strategy["final_recalibrated"], strategy["best_recalibrated"]
    if final is None:
        return "–"
    return f"{format_accuracy(final)} / {format_accuracy(best)}"


def _mean_of(stat: dict[str, Any] | None) -> float | None:
    return None if stat is None else stat["mean"]


def _num(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    """``comparison.md``: one row per strategy, then one row per run."""
    settings = ", ".join(f"{k}={v!r}" for k, v in report["run_config"].items())
    lines = [
        f"# Comparison: {report['title']}",
        "",
        f"Preset `{report['preset']}`: {report['num_supernodes']} clients, "
        f"{report['rounds']} rounds, seeds {', '.join(map(str, report['seeds']))}; "
        f"shared run-config: {settings or 'defaults'}.",
    ]
    for strategy, overrides in report["strategy_config"].items():
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        lines.append(f"`{strategy}` overrides: {shown}.")
    lines += [
        "",
        "Accuracy: total correct / total test samples over all clients, in %, "
        "mean ± std (population) over the seeds that finished: at the last round "
        "(final), the best round (the paper's reading), and the mean of the last "
        f'{LAST} evaluations; with `bn-eval = "both"` also final / best with '
        "BatchNorm statistics recomputed for the evaluated weights (what a "
        "deployed generated model scores; `–` without); s / round: mean "
        "`round_seconds` (wall clock: it grows with whatever else the machine "
        "ran); CPU s / round: mean CPU seconds of the clients plus the server "
        "process per round (other jobs on the machine do not inflate it, but "
        "hosts differ: see each run's machine); MB down / up: array "
        "payload per training client per round (1 MB = 10^6 bytes). Written "
        + report["written"]
        + ".",
        "",
        "| strategy | final acc (%) | best acc (%) | last-5 mean (%) "
        "| final / best, BN recalibrated (%) | s / round | CPU s / round "
        "| MB down / client / round | MB up / client / round | seeds finished "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["strategies"]:
        notes = "; ".join(
            f"seed {r.seed} {r.describe()}" for r in s["runs"] if not r.finished
        )
        lines.append(
            f"| {s['strategy']} | {format_accuracy(s['final_accuracy'])} | "
            f"{format_accuracy(s['best_accuracy'])} | "
            f"{format_accuracy(s['last5_accuracy'])} | "
            f"{format_recalibrated(s)} | "
            f"{_num(_mean_of(s['round_seconds']))} | "
            f"{_num(_mean_of(s['cpu_seconds']), digits=1)} | "
            f"{_num(_mean_of(s['bytes_down_per_client_round']), 1e6, 3)} | "
            f"{_num(_mean_of(s['bytes_up_per_client_round']), 1e6, 3)} | "
            f"{s['seeds_finished']}/{s['seeds_total']} | {_cell(notes)} |"
        )
    lines += by_model_table(report["strategies"])
    lines += [
        "",
        "## Runs",
        "",
        "| run | status | final acc (%) | best acc (%) @ round | rounds | s / round "
        "| CPU s / round | MB down / up per client-round | machine | results | log |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["strategies"]:
        for r in s["runs"]:
            best = (
                "–"
                if r.best_accuracy is None
                else f"{100 * r.best_accuracy:.2f} @ {r.best_round}"
            )
            final = "–" if r.final_accuracy is None else f"{100 * r.final_accuracy:.2f}"
            traffic = (
                f"{_num(r.bytes_down_per_client, 1e6, 3)} / "
                f"{_num(r.bytes_up_per_client, 1e6, 3)}"
            )
            lines.append(
                f"| {r.name} | {_cell(r.describe())} | {final} | {best} | "
                f"{r.rounds}/{r.expected_rounds} | {_num(r.round_seconds)} | "
                f"{_num(r.cpu_seconds, digits=1)} | {traffic} | "
                f"{_cell(r.machine) or '–'} | {r.path or '–'} | "
                f"{r.log or '–'} |"
            )
    return "\n".join(lines) + "\n"


def by_model_table(strategies: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each strategy's final accuracy per architecture (none with
    one architecture)."""
    models = list(dict.fromkeys(m for s in strategies for m in s["final_by_model"]))
    if not models:
        return []
    lines = [
        "",
        "Final accuracy by model (%, stored BatchNorm statistics; total correct / "
        "total test samples of the clients running it, mean ± std over the seeds "
        "that finished):",
        "",
        "| strategy | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for s in strategies:
        if s["final_by_model"]:
            cells = [format_accuracy(s["final_by_model"].get(m)) for m in models]
            lines.append(f"| {s['strategy']} | " + " | ".join(cells) + " |")
    return lines


def as_json(report: dict[str, Any]) -> dict[str, Any]:
    """``comparison.json``: the same numbers (fractions and bytes), paths absolute."""
    out = Path(report["out"])
    strategies = []
    for s in report["strategies"]:
        runs = []
        for r in s["runs"]:
            row = asdict(r)
            row.pop("curve")
            row["path"] = str(out / r.path) if r.path else ""
            row["log"] = str(out / r.log) if r.log else ""
            runs.append(row)
        strategies.append(s | {"runs": runs})
    return report | {"strategies": strategies}


def plot_title(report: dict[str, Any]) -> str:
    """The preset's title, then strategies, dataset (partition), clients, models."""
    try:
        config = load_run_config(report["run_config"]).flat()
    except ConfigError:
        config = report["run_config"]
    strategies = ", ".join(s["strategy"] for s in report["strategies"])
    dataset = config.get("dataset", "?")
    if "partition" in config:
        dataset = f"{dataset} ({config['partition']})"
    models = str(config.get("models", "?")).replace(",", ", ")
    setting = (
        f"{strategies} on {dataset}, {report['num_supernodes']} clients, "
        f"models: {models}"
    )
    return textwrap.fill(report["title"], 80) + "\n" + textwrap.fill(setting, 90)


def figure(report: dict[str, Any]):
    """Mean accuracy curve per strategy over its finished seeds, min-max shaded,
    integer round ticks (a matplotlib figure, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 6))
    colours = plt.get_cmap("tab10" if len(report["strategies"]) <= 10 else "tab20")
    drawn = 0
    for i, s in enumerate(report["strategies"]):
        curves = [dict(r.curve) for r in s["runs"] if r.finished and r.curve]
        if not curves:
            continue
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        if not rounds:
            continue
        values = [[c[rnd] for c in curves] for rnd in rounds]
        colour = colours(i % colours.N)
        ax.plot(
            rounds,
            [sum(v) / len(v) for v in values],
            color=colour,
            label=f"{s['strategy']} ({len(curves)} seed{'s' * (len(curves) > 1)})",
        )
        if len(curves) > 1:
            ax.fill_between(
                rounds,
                [min(v) for v in values],
                [max(v) for v in values],
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over seeds, min-max band)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if drawn:
        # Below the axes, so that no curve is hidden behind it.
        ax.legend(
            fontsize="small",
            ncol=min(drawn, 4),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12),
        )
    ax.set_title(plot_title(report), fontsize="medium")
    fig.tight_layout()
    return fig


def plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, preset: Preset, specs: list[RunSpec]) -> dict[str, Any]:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png``."""
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(out, preset, specs)
    (out / "comparison.md").write_text(markdown(report))
    (out / "comparison.json").write_text(json.dumps(as_json(report), indent=2) + "\n")
    plot(report, out / "comparison.png")
    return report
