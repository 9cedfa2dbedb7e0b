"""One results directory per run: config, clients, per-round metrics, summary, plot.

Layout of ``<results-dir>/<run-name>/``:

``config.json``
    The resolved run configuration (dash-case keys).
``clients.json``
    Per client: name, num-params, chunks, head, train and test examples.
``metrics.jsonl``
    One JSON object per evaluated round (``round``, ``accuracy`` = total correct /
    total test samples, ``accuracy_mean`` = mean of per-client accuracies,
    ``loss``, ``client_accuracy``, ``train_loss``, ``round_seconds``,
    ``server_seconds``, ``bytes_down``, ``bytes_up``, ``rejected_replies``,
    ``server_rss_mb`` / ``server_peak_rss_mb`` (memory of the server process), ...).
``metrics.csv``
    The rows of ``metrics.jsonl`` for a spreadsheet, one per evaluated round:
    ``round``, ``phase``, ``accuracy``, ``accuracy_mean``, ``loss``,
    ``round_seconds``, ``bytes_down``, ``bytes_up``, then every other scalar field
    of the rows, then one ``accuracy[<client>]`` column per client (empty where a
    row has no value, NaN included). Rewritten whole after each round.
``events.out.tfevents.*``
    TensorBoard scalars of the same rows (``accuracy/*``, ``loss/*``,
    ``client_accuracy/<client>``, ``bytes/*``, ``seconds/*``; a ``novel_`` prefix
    on the group for clients that join after training), step = round:
    ``tensorboard --logdir <results-dir>`` shows the runs side by side. A resumed
    run adds a file that hides the rounds computed again. Skipped, with a
    warning, where the ``tensorboard`` package is not installed.
``summary.json``
    ``final_accuracy``, ``best_accuracy``, ``best_round``, ``rounds``,
    ``seconds`` of the training phase; with novel clients also
    ``novel_accuracy_before``, ``novel_final_accuracy``, ``novel_best_accuracy``.
``accuracy.png``
    Accuracy per round, titled with strategy, dataset, clients and models.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import sys
import textwrap
import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from common.config import RunConfig

from .checkpoint import CHECKPOINT_FILE
from .engine.registry import natural_key

#: The first columns of ``metrics.csv``; the other scalar fields follow.
CSV_COLUMNS = (
    "round",
    "phase",
    "accuracy",
    "accuracy_mean",
    "loss",
    "round_seconds",
    "bytes_down",
    "bytes_up",
)
#: TensorBoard tag of each record field written as a scalar.
TENSORBOARD_TAGS = {
    "accuracy": "accuracy/total",
    "accuracy_mean": "accuracy/client_mean",
    "accuracy_recalibrated": "accuracy/recalibrated",
    "loss": "loss/test",
    "train_loss": "loss/train",
    "bytes_down": "bytes/down",
    "bytes_up": "bytes/up",
    "round_seconds": "seconds/round",
    "server_seconds": "seconds/server",
}


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def format_bytes(size: float) -> str:
    """``size`` bytes for a person: ``512 B``, ``3.4 MB``, ``1.20 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{size:.0f} B"


def format_duration(seconds: float) -> str:
    """``seconds`` for a person: ``42s``, ``7m 05s``, ``3h 12m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _csv_cell(value: Any) -> Any:
    """A cell of ``metrics.csv``: empty for a missing value or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def metrics_csv(records: list[dict[str, Any]]) -> str:
    """``records`` as CSV text: :data:`CSV_COLUMNS`, the other scalar fields in the
    order they first appear, then ``accuracy[<client>]`` per client."""
    scalar = (int, float, str, bool)
    columns = dict.fromkeys(CSV_COLUMNS)
    clients: dict[str, None] = {}
    for r in records:
        columns |= dict.fromkeys(k for k, v in r.items() if isinstance(v, scalar))
        clients |= dict.fromkeys(r.get("client_accuracy", {}))
    names = sorted(clients, key=natural_key)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(columns) + [f"accuracy[{n}]" for n in names])
    for r in records:
        per_client = r.get("client_accuracy", {})
        writer.writerow(
            [_csv_cell(r.get(c)) for c in columns]
            + [_csv_cell(per_client.get(n)) for n in names]
        )
    return out.getvalue()


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one record, by tag (:data:`TENSORBOARD_TAGS`
    and ``client_accuracy/<client>``; groups of the novel phase get a ``novel_``
    prefix so they do not mix with the training rounds)."""
    prefix = "" if record.get("phase", "train") == "train" else f"{record['phase']}_"
    scalars = {
        tag: float(record[key])
        for key, tag in TENSORBOARD_TAGS.items()
        if isinstance(record.get(key), int | float)
    }
    for name, value in record.get("client_accuracy", {}).items():
        scalars[f"client_accuracy/{name}"] = float(value)
    return {prefix + tag: value for tag, value in scalars.items()}


def server_memory_mb() -> dict[str, float]:
    """Resident memory of this (the ServerApp's) process now and at its peak, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        now_mb = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        now_mb = peak_mb
    return {"server_rss_mb": now_mb, "server_peak_rss_mb": peak_mb}


class RunResults:
    """Writes the files of one run; :attr:`path` is logged by the ServerApp."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._start = time.time()
        self.config: dict[str, Any] | None = None  # dash-case, as config.json
        self.clients: list[dict[str, Any]] | None = None
        #: TensorBoard writer: ``None`` until the first row, ``False`` without
        #: the ``tensorboard`` package.
        self._writer: Any = None
        #: Rounds from here on were computed again after a resume (TensorBoard
        #: hides the earlier values of them).
        self._purge_step: int | None = None

    @classmethod
    def create(cls, cfg: RunConfig) -> RunResults:
        """Make a fresh directory ``<results-dir>/<run-name>`` (never reuse one)."""
        root = Path(cfg.results_dir).expanduser().resolve()
        name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S-") + cfg.strategy
        path, suffix = root / name, 1
        while path.exists():
            suffix += 1
            path = root / f"{name}-{suffix}"
        path.mkdir(parents=True)
        results = cls(path)
        results.config = cfg.flat()
        _write_json(path / "config.json", results.config)
        results.open_tensorboard()
        return results

    @classmethod
    def reopen(
        cls,
        path: Path,
        cfg: RunConfig,
        records: list[dict[str, Any]],
        from_round: int,
    ) -> RunResults:
        """Continue a run's directory from a round-``from_round`` checkpoint.

        ``records`` are the metric rows the checkpoint holds (evaluation may lag
        training by a round, so they need not reach ``from_round``).

        ``metrics.jsonl`` is rewritten to exactly those rows (rows written after
        the checkpoint are dropped: they are computed again), and
        ``config.json`` takes the resumed run's config.
        """
        results = cls(path)
        results.records = list(records)
        tmp = path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path / "metrics.jsonl")
        results.write_csv()
        results._purge_step = max((r["round"] for r in records), default=0) + 1
        results.config = cfg.flat()
        _write_json(path / "config.json", results.config)
        results.open_tensorboard()
        return results

    def write_clients(self, clients: list[dict[str, Any]]) -> None:
        self.clients = clients
        _write_json(self.path / "clients.json", clients)

    def append(self, record: dict[str, Any]) -> None:
        """Append one evaluated round to ``metrics.jsonl`` (flushed at once), and
        to ``metrics.csv`` and the TensorBoard events."""
        self.records.append(record)
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.write_csv()
        self.write_tensorboard(record)

    def write_csv(self) -> None:
        """(Re)write ``metrics.csv`` from :attr:`records` (a later row may bring
        a column, so the file is written whole)."""
        tmp = self.path / "metrics.csv.tmp"
        tmp.write_text(metrics_csv(self.records))
        os.replace(tmp, self.path / "metrics.csv")

    def open_tensorboard(self) -> None:
        """Start the run's TensorBoard event file (done before the first round, so
        that the import does not count in a round's seconds); without the
        ``tensorboard`` package, warn once and write none."""
        if self._writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._writer = False
            log(WARNING, "The 'tensorboard' package is not installed: no "
                "TensorBoard events for this run (metrics.jsonl and metrics.csv "
                "hold the same numbers); pip install tensorboard")  # fmt: skip
        else:
            self._writer = SummaryWriter(str(self.path), purge_step=self._purge_step)

    def write_tensorboard(self, record: dict[str, Any]) -> None:
        """Add one record's scalars to the run's TensorBoard events (flushed, so a
        running TensorBoard shows the round at once)."""
        self.open_tensorboard()
        if self._writer is False:
            return
        for tag, value in tensorboard_scalars(record).items():
            self._writer.add_scalar(tag, value, record["round"])
        self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (a later row opens a new one)."""
        if self._writer:
            self._writer.close()
            self._writer, self._purge_step = None, None

    def disk_usage(self) -> dict[str, int]:
        """Bytes of the run folder (everything in it) and of its checkpoint
        (0 when there is none)."""
        total = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        checkpoint = self.path / CHECKPOINT_FILE
        size = checkpoint.stat().st_size if checkpoint.is_file() else 0
        return {"run_bytes": total, "checkpoint_bytes": size}

    def describe_disk_usage(self) -> str:
        """:meth:`disk_usage` as a line for the log."""
        usage = self.disk_usage()
        text = f"run folder {format_bytes(usage['run_bytes'])}"
        if usage["checkpoint_bytes"]:
            size = format_bytes(usage["checkpoint_bytes"])
            return f"{text}, of which {CHECKPOINT_FILE} {size}"
        return f"{text}, no {CHECKPOINT_FILE}"

    def summary(self) -> dict[str, Any]:
        """Final and best accuracy of the training phase (and of novel clients)."""
        seconds = time.time() - self._start
        train = [r for r in self.records if r.get("phase", "train") == "train"]
        novel = [r for r in self.records if r.get("phase") == "novel"]
        summary: dict[str, Any] = {"rounds": 0, "seconds": seconds}
        if train:
            best = max(train, key=lambda r: r["accuracy"])
            summary |= {
                "final_accuracy": train[-1]["accuracy"],
                "final_accuracy_mean": train[-1]["accuracy_mean"],
                "best_accuracy": best["accuracy"],
                "best_round": best["round"],
                "rounds": train[-1]["round"],
                "mean_round_seconds": sum(r["round_seconds"] for r in train)
                / len(train),
            }
        if novel:
            summary |= {
                "novel_accuracy_before": novel[0]["accuracy"],
                "novel_final_accuracy": novel[-1]["accuracy"],
                "novel_best_accuracy": max(r["accuracy"] for r in novel),
            }
        return summary

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and ``accuracy.png``, close the TensorBoard
        events; return the summary."""
        self.close()
        summary = self.summary()
        _write_json(self.path / "summary.json", summary)
        if self.records:
            self.plot()
        return summary

    def title(self) -> str:
        """What the run is: strategy, dataset (partition), clients and models."""
        config = self.config
        if config is None:
            try:
                config = json.loads((self.path / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
        if self.clients is not None:
            clients = len(self.clients)
            novel = sum(bool(c.get("novel")) for c in self.clients)
        else:
            clients = max((len(r.get("client_accuracy", {})) for r in self.records),
                          default=0)  # fmt: skip
            novel = 0
        models = str(config.get("models", "?")).replace(",", ", ")
        dataset = config.get("dataset", "?")
        if "partition" in config:
            dataset = f"{dataset} ({config['partition']})"
        count = f"{clients} clients" + (f" ({novel} novel)" if novel else "")
        return f"{config.get('strategy', '?')} on {dataset}, {count}, models: {models}"

    def figure(self):
        """The accuracy plot as a matplotlib figure (Agg): accuracy and mean
        client accuracy per round and phase, integer round ticks."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for phase in dict.fromkeys(r.get("phase", "train") for r in self.records):
            rows = [r for r in self.records if r.get("phase", "train") == phase]
            rounds = [r["round"] for r in rows]
            label = "accuracy" if phase == "train" else f"accuracy ({phase} clients)"
            marker = "o" if len(rows) <= 30 else None
            ax.plot(rounds, [r["accuracy"] for r in rows], label=label, marker=marker)
            ax.plot(
                rounds,
                [r["accuracy_mean"] for r in rows],
                label=f"mean client {label}",
                linestyle="--",
                marker=marker,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(textwrap.fill(self.title(), 72), fontsize="medium")
        fig.tight_layout()
        return fig

    def plot(self) -> None:
        """Write ``accuracy.png`` (:meth:`figure`)."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(self.path / "accuracy.png", dpi=120)
        plt.close(fig)
