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
``machine.json``
    Where the run was computed (:func:`common.machine.machine`, measured in the
    ServerApp's process, which shares the host with the clients in a
    simulation): a list with one entry per start, ``from_round`` 0 for the
    first and the checkpoint's round for each resume, so a run continued on
    another host says so.
``summary.json``
    ``final_accuracy``, ``best_accuracy``, ``best_round``, ``rounds``,
    ``seconds`` of the training phase; with novel clients also
    ``novel_accuracy_before``, ``novel_final_accuracy``, ``novel_best_accuracy``.
``accuracy.png``
    Accuracy per round.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.machine import machine


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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
        _write_json(path / "config.json", cfg.flat())
        results.record_machine(from_round=0)
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
        _write_json(path / "config.json", cfg.flat())
        results.record_machine(from_round)
        return results

    def record_machine(self, from_round: int) -> None:
        """Add this host to ``machine.json`` as computing rounds after ``from_round``.

        Entries of earlier starts that begin before ``from_round`` are kept (the
        rounds they computed stay in ``metrics.jsonl``); later ones are dropped,
        since their rounds are computed again. An unreadable file is replaced
        rather than failing the run.
        """
        path = self.path / "machine.json"
        try:
            starts = json.loads(path.read_text())
        except (OSError, ValueError):
            starts = []
        if not isinstance(starts, list):
            starts = []
        starts = [
            s
            for s in starts
            if isinstance(s, dict) and s.get("from_round", 0) < from_round
        ]
        _write_json(path, starts + [{"from_round": from_round, **machine()}])

    def write_clients(self, clients: list[dict[str, Any]]) -> None:
        _write_json(self.path / "clients.json", clients)

    def append(self, record: dict[str, Any]) -> None:
        """Append one evaluated round to ``metrics.jsonl`` (flushed at once)."""
        self.records.append(record)
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

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
        """Write ``summary.json`` and ``accuracy.png``; return the summary."""
        summary = self.summary()
        _write_json(self.path / "summary.json", summary)
        if self.records:
            self.plot()
        return summary

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for phase in dict.fromkeys(r.get("phase", "train") for r in self.records):
            rows = [r for r in self.records if r.get("phase", "train") == phase]
            rounds = [r["round"] for r in rows]
            label = "accuracy" if phase == "train" else f"accuracy ({phase} clients)"
            ax.plot(rounds, [r["accuracy"] for r in rows], label=label)
            ax.plot(
                rounds,
                [r["accuracy_mean"] for r in rows],
                label=f"mean client {label}",
                linestyle="--",
            )
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(self.path.name)
        fig.tight_layout()
        fig.savefig(self.path / "accuracy.png", dpi=120)
        plt.close(fig)
