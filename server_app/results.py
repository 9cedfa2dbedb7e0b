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
    ``server_seconds``, ``bytes_down``, ``bytes_up``, ...).
``summary.json``
    ``final_accuracy``, ``best_accuracy``, ``best_round``, ``rounds``,
    ``seconds``.
``accuracy.png``
    Accuracy per round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from common.config import RunConfig


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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
        return results

    def write_clients(self, clients: list[dict[str, Any]]) -> None:
        _write_json(self.path / "clients.json", clients)

    def append(self, record: dict[str, Any]) -> None:
        """Append one evaluated round to ``metrics.jsonl`` (flushed at once)."""
        self.records.append(record)
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def summary(self) -> dict[str, Any]:
        if not self.records:
            return {"rounds": 0, "seconds": time.time() - self._start}
        best = max(self.records, key=lambda r: r["accuracy"])
        final = self.records[-1]
        return {
            "final_accuracy": final["accuracy"],
            "final_accuracy_mean": final["accuracy_mean"],
            "best_accuracy": best["accuracy"],
            "best_round": best["round"],
            "rounds": final["round"],
            "seconds": time.time() - self._start,
            "mean_round_seconds": sum(r["round_seconds"] for r in self.records)
            / len(self.records),
        }

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

        rounds = [r["round"] for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, [r["accuracy"] for r in self.records], label="accuracy")
        ax.plot(
            rounds,
            [r["accuracy_mean"] for r in self.records],
            label="mean client accuracy",
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
