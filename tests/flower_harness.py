"""Real Flower processes for end-to-end tests: a SuperLink and `flwr run`.

The SuperLink runs in simulation mode on free loopback ports, with its own
``FLWR_HOME``, started from a neutral temporary folder (so its ClientApps import
the submitted app, never this checkout's working directory) and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def as_overrides(values: dict) -> str:
    """``{"a": 1, "b": "x"}`` -> ``a=1 b="x"`` for ``--run-config``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` owned by one test (or session)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.control = f"127.0.0.1:{free_port()}"
        self.env = os.environ | {
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen | None = None
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "e2e"\n\n'
            f'[superlink.e2e]\naddress = "{self.control}"\ninsecure = true\n'
        )

    def start(self, timeout: float = 60.0) -> SimulationSuperLink:
        log = (self.workdir / "superlink.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                # Flower 1.41 serves the Control, Fleet and runtime APIs on one port.
                "--host",
                "127.0.0.1",
                "--port",
                self.control.split(":")[1],
            ],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        host, port = self.control.split(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "flower-superlink exited: "
                    + (self.workdir / "superlink.log").read_text()[-3000:]
                )
            try:
                with socket.create_connection((host, int(port)), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("flower-superlink did not start in time")

    def run(
        self,
        run_config: dict,
        num_supernodes: int,
        timeout: float = 900.0,
        app: Path = APP,
    ) -> subprocess.CompletedProcess:
        """``flwr run <app> e2e --stream`` with the given overrides; waits for it."""
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(app),
            "e2e",
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--run-config",
            as_overrides(run_config),
            "--stream",
        ]
        return subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
