"""A server crash end to end: the ServerApp's process is killed mid-run under a
real `flwr run`, and a second `flwr run` with ``resume-from`` finishes the run
from the last checkpoint, in the same results directory."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import write_learnable_imagefolder
from tools.processes import descendants
from tools.superlink import SimulationSuperLink

pytestmark = pytest.mark.e2e


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_server_killed_mid_run_resumes_from_checkpoint(tmp_path):
    data = write_learnable_imagefolder(tmp_path / "data", 4, 30)
    link = SimulationSuperLink(tmp_path / "link").start()
    results = tmp_path / "results"
    config = {
        "dataset": "imagefolder",
        "data-dir": str(data),
        "results-dir": str(results),
        "run-name": "crash",
        "num-server-rounds": 8,
        "checkpoint-every": 2,
        "chunk-size": 1024,
        "local-epochs": 2,
    }
    killed: list[int] = []

    def kill_server(line: str) -> None:
        """Kill the process hosting the ServerApp after round 2's checkpoint."""
        if killed or "round 2: checkpoint written" not in line:
            return
        for pid in descendants(link.proc.pid):
            if "flwr-simulation" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    try:
        link.run_logged(config, 2, tmp_path / "first.log", 600, on_line=kill_server)
        first = (tmp_path / "first.log").read_text()
        assert killed, first[-3000:]
        run_dir = results / "crash"
        assert (run_dir / "checkpoint.pt").is_file()
        done = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").open()]
        assert max(done, default=0) < 8, "the run ended before it was killed"

        link.run_logged(
            config | {"resume-from": "crash"}, 2, tmp_path / "second.log", 600
        )
        second = (tmp_path / "second.log").read_text()
        assert "Resuming after round" in second, second[-3000:]
        rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").open()]
        assert rounds == list(range(1, 9)), second[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds"] == 8 and summary["final_accuracy"] > 0.25
    finally:
        link.stop()
