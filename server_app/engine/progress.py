"""One log line per round, and the evaluated rounds' rows in the results."""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from ..results import RunResults, format_bytes, format_duration


class Progress:
    """Where the run is (phase, round, last round) and what it logs.

    Attributes
    ----------
    phase : str
        ``"train"``, or ``"novel"`` for clients that join after training.
    current_round, last_round : int
        The round in progress and the phase's last round.
    """

    def __init__(self, last_round: int) -> None:
        self.phase = "train"
        self.current_round = 0
        self.last_round = last_round
        self.round_times: dict[str, list[float]] = {}  # per phase, for the ETA

    def finish_round(
        self,
        results: RunResults,
        record: dict[str, Any],
        evaluation: dict[str, Any] | None,
    ) -> None:
        """Write an evaluated round's row and log its progress line.

        A record of a round before :attr:`current_round` is an evaluation that
        rode on a later round's messages (or is due after a resume): its training
        part was logged when the round ended, so only the accuracy is logged.
        """
        rnd = record["round"]
        carried = rnd != self.current_round
        if evaluation is None:
            log(WARNING, "round %d: no evaluation replies", rnd)
            if not carried:
                self.log(record, "acc - (no evaluation replies)")
            return
        record = {"round": rnd, "phase": self.phase, **evaluation, **record}
        results.append(record)
        accuracy = (
            f"acc {100 * record['accuracy']:.2f}% (client mean "
            f"{100 * record['accuracy_mean']:.2f}%) | test loss {record['loss']:.4f}"
        )
        if carried:
            log(INFO, "%s | %s", self.label(rnd), accuracy)
        else:
            self.log(record, accuracy)

    def label(self, server_round: int) -> str:
        """``round k/N`` (``novel round k/N`` for clients that join later)."""
        phase = "" if self.phase == "train" else f"{self.phase} "
        return f"{phase}round {server_round}/{self.last_round}"

    def log(self, record: dict[str, Any], accuracy: str = "") -> None:
        """Log a round's line as soon as it ends: ``round k/N | acc | train loss
        | seconds | ETA | bytes`` (what the record has of it).

        The ETA is the mean of the phase's last 10 round durations times the
        rounds left. A round without evaluation has no ``acc`` part; one whose
        evaluation rides on the next round says so, and :meth:`finish_round`
        logs the accuracy when it arrives.
        """
        rnd = record["round"]
        seconds = record.get("round_seconds", record.get("train_seconds", 0.0))
        times = self.round_times.setdefault(self.phase, [])
        times.append(seconds)
        eta = np.mean(times[-10:]) * max(0, self.last_round - rnd)
        parts = [self.label(rnd)] + ([accuracy] if accuracy else [])
        if "train_loss" in record:
            parts.append(f"train loss {record['train_loss']:.4f}")
        parts += [f"{seconds:.2f} s", f"ETA {format_duration(eta)}"]
        if "bytes_down" in record:
            parts.append(f"down {format_bytes(record['bytes_down'])}, "
                         f"up {format_bytes(record['bytes_up'])}")  # fmt: skip
        log(INFO, "%s", " | ".join(parts))
