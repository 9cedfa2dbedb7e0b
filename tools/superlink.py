"""Real Flower processes: a private simulation SuperLink and `flwr run` against it.

The SuperLink runs in simulation mode on a free loopback port, with its own
``FLWR_HOME``, started from a neutral folder (so its ClientApps import the
submitted app, never the caller's working directory) and stopped by PID: its
whole process group (the SuperExec, the simulation runtime and Ray) goes with it.
Used by ``tools.compare``, ``scripts/parity.py`` and the end-to-end tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tools import processes

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[1]
#: Name of the SuperLink connection in the private ``FLWR_HOME/config.toml``.
FEDERATION = "e2e"


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
    """A ``flower-superlink --simulation`` owned by one caller (test, script, tool).

    Parameters
    ----------
    workdir : Path
        Folder for its ``FLWR_HOME``, its log (``superlink.log``) and the working
        directory of every process it starts.
    """

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
            f'[superlink]\ndefault = "{FEDERATION}"\n\n'
            f'[superlink.{FEDERATION}]\naddress = "{self.control}"\ninsecure = true\n'
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
                # Flower 1.42 serves the Control, Fleet and runtime APIs on one port.
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
        log.close()  # the child holds its own descriptor
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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(
        self,
        run_config: dict,
        num_supernodes: int,
        app: Path = APP,
        resources: dict | None = None,
    ) -> list[str]:
        """The ``flwr run <app> <federation> ... --stream`` command line.

        ``resources`` overrides the federation config of each simulated client
        (default ``{"client-resources-num-cpus": 1}``).
        """
        federation = {
            "num-supernodes": num_supernodes,
            **(resources or {"client-resources-num-cpus": 1}),
        }
        return [
            str(BIN / "flwr"),
            "run",
            str(app),
            FEDERATION,
            "--federation-config",
            as_overrides(federation),
            "--run-config",
            as_overrides(run_config),
            "--stream",
        ]

    def run(
        self,
        run_config: dict,
        num_supernodes: int,
        timeout: float = 900.0,
        app: Path = APP,
        resources: dict | None = None,
    ) -> subprocess.CompletedProcess:
        """``flwr run`` with the given overrides; waits and captures its output."""
        return subprocess.run(
            self.command(run_config, num_supernodes, app, resources),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_logged(
        self,
        run_config: dict,
        num_supernodes: int,
        log_path: Path,
        timeout: float | None = None,
        app: Path = APP,
        resources: dict | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> tuple[int, bool]:
        """``flwr run`` streaming its output into ``log_path`` (and ``on_line``).

        Returns ``(exit code, timed out)``. On a timeout ``flwr run`` is killed;
        the run itself goes on inside the SuperLink, so stop (and restart) the
        SuperLink before submitting the next one.
        """
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                self.command(run_config, num_supernodes, app, resources),
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                proc.kill()

            timer = threading.Timer(timeout, expire) if timeout else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if on_line is not None:
                        on_line(line)
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        return proc.returncode, expired.is_set()

    def stop(self) -> None:
        """Stop the SuperLink and every process it started, by process group.

        The SuperExec it spawns runs in a session of its own (with the simulation
        runtime and Ray inside), so the groups of all its descendants are
        signalled too: SIGTERM first, SIGKILL for what is left after a grace time.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = [self.proc.pid, *processes.descendants(self.proc.pid)]
        family = processes.identities(pids)
        groups = {group for group in map(processes.pgid, pids) if group is not None}
        groups.discard(os.getpgrp())  # never our own (or our caller's) group
        for group in groups:
            processes.signal_group(group, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            processes.signal_group(os.getpgid(self.proc.pid), signal.SIGKILL)
            self.proc.wait(timeout=10)
        processes.stop_family(family, grace=15.0)
