"""What a round costs: server and client compute, bytes, memory (one window)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from common import protocol as P

from ..results import server_memory_mb


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data in a message (what dominates its size on the wire)."""
    return sum(
        len(array.data)
        for record in content.array_records.values()
        for array in record.values()
    )


def _seconds(metrics: MetricRecord | None, key: str = P.SECONDS) -> float:
    """A record's ``key`` metric when it is a finite number >= 0, else 0."""
    value = None if metrics is None else metrics.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0.0
    return float(value) if np.isfinite(value) and value >= 0 else 0.0


class Costs:
    """The counters of one window (a round, or an evaluation before fitting):
    started by :meth:`start`, read by :meth:`record`."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        """Zero every counter and note this process's CPU time."""
        self.server_seconds = 0.0
        self.bytes_down = self.bytes_up = 0
        self.client_train_seconds_sum = 0.0
        self.client_eval_seconds_sum = 0.0
        self.client_cpu_seconds_sum = 0.0
        self.client_message_cpu_seconds_sum = 0.0
        self.client_messages = 0
        self.process_cpu_start = time.process_time()

    @contextmanager
    def server_time(self):
        """Add the wall-clock seconds of the ``with`` body to the server's compute."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.server_seconds += time.perf_counter() - start

    def sent(self, content: RecordDict) -> None:
        """Count one message going down."""
        self.bytes_down += payload_bytes(content)

    def received(self, kind: str, content: RecordDict) -> None:
        """Count one accepted reply: its bytes and its client-measured compute.

        A train reply's ``seconds`` (local training, required) goes to the train
        sum; the ``seconds`` of an evaluation reply and of the evaluation a train
        reply carries (the evaluation loop; optional) go to the evaluation sum;
        the ``cpu-seconds`` of all of them (optional) to the CPU sum, and the
        reply's ``message-cpu-seconds`` (optional: the client's CPU time for the
        whole message, carried evaluation included) to the message CPU sum.
        Replies count when they are processed, whatever round they answer, so the
        sums cover the same wall-clock window as the record's ``round_seconds``
        (a carried evaluation of round ``r`` is counted in round ``r + 1``, whose
        messages it rode on).
        """
        self.bytes_up += payload_bytes(content)
        self.client_messages += 1
        metrics = content.metric_records.get(P.METRICS)
        carried = content.metric_records.get(P.EVAL_METRICS)
        if kind == "train":
            self.client_train_seconds_sum += _seconds(metrics)
            self.client_eval_seconds_sum += _seconds(carried)
        else:
            self.client_eval_seconds_sum += _seconds(metrics)
        for record in (metrics, carried):
            self.client_cpu_seconds_sum += _seconds(record, P.CPU_SECONDS)
        self.client_message_cpu_seconds_sum += _seconds(metrics, P.MESSAGE_CPU_SECONDS)

    def record(self, record: dict[str, Any], t0: float) -> dict[str, Any]:
        """``record`` with the window's costs: wall-clock seconds since ``t0``,
        server compute, client-reported compute, bytes, server memory.

        ``client_*_sum`` add up what the ``client_messages`` replies of the window
        report; ``server_process_cpu_seconds`` is the CPU time of this whole
        process in the window (server compute, and in simulation also the engine
        that runs in it); ``finished_at`` the Unix time of the record.
        """
        return record | {
            "round_seconds": time.perf_counter() - t0,
            "server_seconds": self.server_seconds,
            "client_train_seconds_sum": self.client_train_seconds_sum,
            "client_eval_seconds_sum": self.client_eval_seconds_sum,
            "client_cpu_seconds_sum": self.client_cpu_seconds_sum,
            "client_message_cpu_seconds_sum": self.client_message_cpu_seconds_sum,
            "client_messages": self.client_messages,
            "server_process_cpu_seconds": time.process_time() - self.process_cpu_start,
            "finished_at": time.time(),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            **server_memory_mb(),
        }
