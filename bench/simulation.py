"""What the simulation benchmarks share: one ``flwr run``, its processes' memory.

:func:`run_simulation` runs one setting through a real ``flwr run`` on a private
simulation SuperLink (:class:`tools.superlink.SimulationSuperLink`, stopped by
process group afterwards, also on failure) and returns the run's results files and
its streamed log, each line with the second it arrived.

:class:`MemorySampler` samples, every ``interval`` seconds, every descendant
process of the benchmark (the SuperLink, its SuperExec, ``flwr-simulation`` that
hosts the ServerApp and the simulation engine, Ray's ``gcs_server``, ``raylet``,
agents and ``ClientAppActor`` workers, and the ``flwr run`` CLI) from ``/proc``:

- ``VmRSS`` (resident now) and ``VmHWM`` (the process's own resident peak, exact
  even between samples) of ``/proc/<pid>/status``;
- ``Pss`` of ``/proc/<pid>/smaps_rollup``: resident memory with each shared page
  divided among the processes that map it, so PSS adds up across processes
  (RSS counts shared libraries and Ray's shared object store in every process).

- CPU seconds (``utime + stime`` of ``/proc/<pid>/stat``).

Processes are grouped by kind (:func:`process_kind`); :func:`summarise_samples`
gives per kind the most processes seen at once, the largest peak of one process
(``VmHWM``), the peak of the kind's summed RSS and PSS over samples and its CPU
seconds, plus the same sums over all processes and the lowest ``MemAvailable``
of the machine.

The sampler also reads the machine's busy CPU time (``/proc/stat``) at its start
and end: what the machine spent beyond the benchmark's own processes is other
jobs' load (``foreign_cpu_share`` of the machine's capacity), which inflates
every wall-clock figure of the run (:func:`cpu_share`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.processes import descendants
from tools.superlink import SimulationSuperLink

REPO = Path(__file__).resolve().parents[1]
PROC = Path("/proc")
#: Resources of one simulated client, as in ``simulation.toml``.
CLIENT_RESOURCES = {"client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0}


def default_data_dir() -> Path:
    """Where ``make`` looks for data: ``../shared/data`` when it holds the
    CIFAR-10 copy, else ``~/.cache/mh-pfedhn/data`` (always absolute: the
    SuperLink runs in another folder)."""
    shared = REPO.parent / "shared" / "data"
    if (shared / "cifar10-jpg.tar.gz").exists():
        return shared.resolve()
    return Path("~/.cache/mh-pfedhn/data").expanduser()


def parallel_workers(client_cpus: float, cpus: int | None = None) -> int:
    """ClientApps the Ray backend runs at once: ``cpus // client_cpus`` (>= 1)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, int(cpus // client_cpus))


# -- /proc ---------------------------------------------------------------------------
def _kb_fields(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    """``Key:   123 kB`` lines of a ``/proc`` file -> ``{key: kB}`` for ``keys``."""
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            parts = rest.split()
            if parts and parts[0].isdigit():
                found[key] = int(parts[0])
    return found


def cpu_seconds(stat: str, tick: float | None = None) -> float:
    """``utime + stime`` of a ``/proc/<pid>/stat`` line, seconds."""
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
    tick = tick or os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def process_state(stat: str) -> str:
    """The state letter of a ``/proc/<pid>/stat`` line (``R`` running or waiting
    for a core, ``S`` sleeping, ...)."""
    return stat[stat.rfind(")") + 2 :].split(maxsplit=1)[0]


def machine_busy_seconds(proc: Path = PROC) -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine since boot (all cores):
    the ``cpu`` line of ``/proc/stat``; busy excludes ``idle`` and ``iowait``
    (``guest`` time is already inside ``user``)."""
    line = (proc / "stat").read_text().splitlines()[0].split()
    ticks = [int(v) for v in line[1:9]]  # user nice system idle iowait irq soft steal
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / tick, sum(ticks) / tick


def read_process(
    pid: int, proc: Path = PROC, pss: bool = True
) -> dict[str, Any] | None:
    """``{pid, kind, rss_kb, hwm_kb, pss_kb, cpu_s}`` of one process, or ``None``
    when it is gone, exiting (its command line is already empty), a zombie or a
    kernel thread. Without ``pss`` (reading ``smaps_rollup`` costs milliseconds
    per process), ``pss_kb`` is the RSS."""
    base = proc / str(pid)
    try:
        status = (base / "status").read_text()
        cmdline = (base / "cmdline").read_bytes()
        stat = (base / "stat").read_text()
        cpu, state = cpu_seconds(stat), process_state(stat)
    except (OSError, IndexError, ValueError):
        return None
    fields = _kb_fields(status, ("VmRSS", "VmHWM"))
    if "VmRSS" not in fields:
        return None
    argv = [a for a in cmdline.decode(errors="replace").split("\0") if a]
    if not argv:
        return None
    shared = None
    if pss:
        try:
            rollup = (base / "smaps_rollup").read_text()
            shared = _kb_fields(rollup, ("Pss",)).get("Pss")
        except OSError:
            pass
    return {
        "pid": pid,
        "kind": process_kind(argv),
        "rss_kb": fields["VmRSS"],
        "hwm_kb": fields.get("VmHWM", fields["VmRSS"]),
        "pss_kb": fields["VmRSS"] if shared is None else shared,
        "cpu_s": cpu,
        "state": state,
    }


#: ``(kind, test on the program names)``, first match wins; ``names`` are the
#: base names of the first two arguments (interpreter and script).
_KINDS: tuple[tuple[str, Any], ...] = (
    ("ray ClientAppActor", lambda t, n: t.startswith("ray::ClientAppActor")),
    ("ray idle worker", lambda t, n: t.startswith("ray::IDLE")),
    ("ray agents", lambda t, n: t.startswith("ray::")),
    ("SuperLink", lambda t, n: "flower-superlink" in n),
    ("SuperExec", lambda t, n: "flower-superexec" in n),
    ("flwr-simulation (ServerApp)", lambda t, n: "flwr-simulation" in n),
    ("flwr run (CLI)", lambda t, n: "flwr" in n),
    ("raylet", lambda t, n: "raylet" in n),
    ("gcs_server", lambda t, n: "gcs_server" in n),
    ("ray worker", lambda t, n: "default_worker.py" in n),
    ("ray agents", lambda t, n: "/ray/" in t),
)


def process_kind(argv: list[str]) -> str:
    """What a process is, from its command line (see the module docstring)."""
    if not argv:
        return "other"
    title = " ".join(argv)
    names = {Path(a).name for a in argv[:2]}
    for kind, test in _KINDS:
        if test(title, names):
            return kind
    return "other"


def sample(root: int, proc: Path = PROC, pss: bool = True) -> list[dict[str, Any]]:
    """One reading of every live descendant of ``root``."""
    found = (read_process(pid, proc, pss) for pid in descendants(root))
    return [p for p in found if p is not None]


def mem_available_mb(proc: Path = PROC) -> float | None:
    """``MemAvailable`` of the machine, MB."""
    try:
        text = (proc / "meminfo").read_text()
    except OSError:
        return None
    kb = _kb_fields(text, ("MemAvailable",)).get("MemAvailable")
    return None if kb is None else kb / 1024


def summarise_samples(samples: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Peaks per process kind and in total, MB (see the module docstring).

    ``samples`` is a list of readings (each a list of :func:`read_process`
    dicts). ``peak_hwm_mb`` is the largest ``VmHWM`` of one process of the kind;
    ``peak_rss_mb`` / ``peak_pss_mb`` the largest sum over the kind's processes
    in one reading; ``sum_hwm_mb`` adds every process's own peak (an upper bound
    of the peak sum that short peaks between readings cannot escape);
    ``cpu_s`` adds the last CPU seconds read of each of its processes. A process
    counts as the kind of its last reading throughout (a Ray worker is a plain
    ``default_worker.py`` until it names itself after its actor).
    """
    last_kind = {p["pid"]: p["kind"] for reading in samples for p in reading}
    samples = [[p | {"kind": last_kind[p["pid"]]} for p in r] for r in samples]
    kinds: dict[str, dict[str, Any]] = {}
    total_rss = total_pss = 0.0
    hwm: dict[int, tuple[str, int]] = {}
    cpu: dict[int, float] = {}
    for reading in samples:
        sums: dict[str, list[float]] = {}
        for p in reading:
            entry = sums.setdefault(p["kind"], [0, 0, 0])
            entry[0] += p["rss_kb"]
            entry[1] += p["pss_kb"]
            entry[2] += 1
            peak = max(p["hwm_kb"], hwm.get(p["pid"], ("", 0))[1])
            hwm[p["pid"]] = (p["kind"], peak)
            cpu[p["pid"]] = max(p.get("cpu_s", 0.0), cpu.get(p["pid"], 0.0))
        for kind, (rss, pss, count) in sums.items():
            k = kinds.setdefault(
                kind, {"processes": 0, "peak_rss_mb": 0.0, "peak_pss_mb": 0.0}
            )
            k["processes"] = max(k["processes"], count)
            k["peak_rss_mb"] = max(k["peak_rss_mb"], rss / 1024)
            k["peak_pss_mb"] = max(k["peak_pss_mb"], pss / 1024)
        total_rss = max(total_rss, sum(s[0] for s in sums.values()) / 1024)
        total_pss = max(total_pss, sum(s[1] for s in sums.values()) / 1024)
    for kind, k in kinds.items():
        peaks = [kb for kd, kb in hwm.values() if kd == kind]
        k["peak_hwm_mb"] = max(peaks, default=0) / 1024
        k["sum_hwm_mb"] = sum(peaks) / 1024
        k["pids_seen"] = len(peaks)
        k["cpu_s"] = sum(s for pid, s in cpu.items() if hwm[pid][0] == kind)
    return {
        "kinds": dict(sorted(kinds.items())),
        "total_peak_rss_mb": total_rss,
        "total_peak_pss_mb": total_pss,
        "total_sum_hwm_mb": sum(kb for _, kb in hwm.values()) / 1024,
        "total_cpu_s": sum(cpu.values()),
        "samples": len(samples),
    }


def cpu_share(
    machine_busy_s: float, ours_s: float, elapsed_s: float, cpus: int
) -> dict[str, float]:
    """The machine's CPU over a run: ours, other jobs' (``foreign``), both as a
    share of the capacity ``elapsed x cpus``."""
    foreign = max(0.0, machine_busy_s - ours_s)
    capacity = elapsed_s * cpus
    return {
        "elapsed_s": elapsed_s,
        "cpus": cpus,
        "machine_busy_s": machine_busy_s,
        "ours_cpu_s": ours_s,
        "foreign_cpu_s": foreign,
        "ours_cpu_share": ours_s / capacity if capacity else 0.0,
        "foreign_cpu_share": foreign / capacity if capacity else 0.0,
    }


def cpu_between(
    samples: list[list[dict[str, Any]]], times: list[float], start: float, end: float
) -> dict[str, float]:
    """CPU seconds each kind of process used between Unix times ``start`` and
    ``end``: per process, its cumulative CPU at the last reading at or before
    ``end`` minus that at or before ``start`` (0 when not yet seen; a process
    that is gone keeps its last reading). Kinds as in :func:`summarise_samples`.
    """
    last_kind = {p["pid"]: p["kind"] for reading in samples for p in reading}

    def at(moment: float) -> dict[int, float]:
        found: dict[int, float] = {}
        for when, reading in zip(times, samples, strict=True):
            if when > moment:
                break
            found.update((p["pid"], p["cpu_s"]) for p in reading)
        return found

    before, after = at(start), at(end)
    kinds: dict[str, float] = {}
    for pid, cpu in after.items():
        kind = last_kind[pid]
        kinds[kind] = kinds.get(kind, 0.0) + cpu - before.get(pid, 0.0)
    return dict(sorted(kinds.items()))


def idle_between(
    samples: list[list[dict[str, Any]]],
    times: list[float],
    start: float,
    end: float,
    kind: str,
) -> dict[str, float]:
    """Seconds the processes of ``kind`` slept between Unix times ``start`` and
    ``end``: each interval between consecutive readings in the window counts as
    sleeping for a process whose main thread was sleeping (state ``S``) at the
    interval's first reading. For a ClientApp actor that is waiting for its next
    message (idle worker); a process that waits for a core is runnable (``R``)
    and counts as busy, so other jobs do not inflate it. Returns ``idle_s``,
    ``seen_s`` (the seconds of readings of such processes) and ``processes``.
    """
    last_kind = {p["pid"]: p["kind"] for reading in samples for p in reading}
    idle = seen = 0.0
    pids: set[int] = set()
    for (when, reading), following in zip(
        zip(times, samples, strict=True), times[1:], strict=False
    ):
        if when < start or following > end:
            continue
        for p in reading:
            if last_kind[p["pid"]] != kind:
                continue
            pids.add(p["pid"])
            seen += following - when
            if p.get("state") == "S":
                idle += following - when
    return {"idle_s": idle, "seen_s": seen, "processes": len(pids)}


def peak_rss_mb(
    samples: list[list[dict[str, Any]]],
    times: list[float],
    kind: str,
    until: float | None = None,
) -> float | None:
    """Largest summed RSS (MB) of the processes of ``kind`` in the readings up to
    Unix time ``until`` (all readings when ``None``); ``None`` without any."""
    sums = [
        sum(p["rss_kb"] for p in reading if p["kind"] == kind) / 1024
        for when, reading in zip(times, samples, strict=True)
        if until is None or when <= until
    ]
    return max(sums, default=None)


class MemorySampler:
    """Samples the descendants of this process in a background thread (and the
    machine's CPU time at the start and end)."""

    def __init__(
        self, interval: float = 1.0, root: int | None = None, pss: bool = True
    ) -> None:
        self.interval = interval
        self.root = root or os.getpid()
        self.pss = pss
        self.samples: list[list[dict[str, Any]]] = []
        #: Unix time of each reading in :attr:`samples`.
        self.times: list[float] = []
        self.min_available_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start: tuple[float, float, float] | None = None
        self._end: tuple[float, float, float] | None = None

    def _clock(self) -> tuple[float, float, float]:
        """(monotonic seconds, machine busy seconds, this process's CPU seconds)"""
        own = cpu_seconds(Path(f"/proc/{os.getpid()}/stat").read_text())
        return time.monotonic(), machine_busy_seconds()[0], own

    def _loop(self) -> None:
        while not self._stop.is_set():
            reading = sample(self.root, pss=self.pss)
            if reading:
                self.times.append(time.time())
                self.samples.append(reading)
            available = mem_available_mb()
            if available is not None:
                low = self.min_available_mb
                self.min_available_mb = (
                    available if low is None else min(low, available)
                )
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._start = self._clock()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._end = self._clock()

    def summary(self) -> dict[str, Any]:
        """:func:`summarise_samples`, ``MemAvailable`` and :func:`cpu_share`."""
        found = summarise_samples(self.samples)
        found["min_mem_available_mb"] = self.min_available_mb
        if self._start and self._end:
            (t0, busy0, own0), (t1, busy1, own1) = self._start, self._end
            ours = found["total_cpu_s"] + own1 - own0
            found["cpu"] = cpu_share(busy1 - busy0, ours, t1 - t0, os.cpu_count() or 1)
        return found


# -- one run -------------------------------------------------------------------------
@dataclass
class SimulationRun:
    """What one ``flwr run`` left: its results files and its streamed log."""

    returncode: int
    timed_out: bool
    wall_seconds: float
    run_dir: Path
    #: Unix time at which ``flwr run`` started (``lines`` count from there).
    started_at: float
    #: ``(seconds since the start of flwr run, line)`` of its streamed output.
    lines: list[tuple[float, str]] = field(default_factory=list)

    def _json(self, name: str) -> Any:
        path = self.run_dir / name
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    @property
    def clients(self) -> list[dict[str, Any]]:
        return self._json("clients.json") or []

    @property
    def summary(self) -> dict[str, Any]:
        return self._json("summary.json") or {}

    def check(self) -> None:
        """Raise with the log's tail unless the run finished with results."""
        if self.returncode != 0 or self.timed_out or not self.rows:
            tail = "".join(line for _, line in self.lines[-40:])
            raise RuntimeError(
                f"flwr run failed (exit {self.returncode}, timed out "
                f"{self.timed_out}, {len(self.rows)} rows):\n{tail}"
            )


def run_simulation(
    workdir: Path,
    run_config: dict[str, Any],
    num_supernodes: int,
    timeout: float,
    resources: dict[str, Any] | None = None,
) -> SimulationRun:
    """One ``flwr run`` on a fresh private SuperLink in ``workdir``.

    Results go to ``workdir/results/<run-name>`` (``run-name`` defaults to
    ``bench``); the log to ``workdir/flwr-run.log``. The SuperLink and every
    process it started are stopped before this returns.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "results-dir": str((workdir / "results").resolve()),
        "run-name": "bench",
        **run_config,
    }
    lines: list[tuple[float, str]] = []
    link = SimulationSuperLink(workdir.resolve()).start()
    start, started_at = time.monotonic(), time.time()
    try:
        code, timed_out = link.run_logged(
            config,
            num_supernodes,
            workdir / "flwr-run.log",
            timeout=timeout,
            resources=resources or CLIENT_RESOURCES,
            on_line=lambda line: lines.append((time.monotonic() - start, line)),
        )
    finally:
        wall = time.monotonic() - start
        link.stop()
    run_dir = Path(config["results-dir"]) / config["run-name"]
    return SimulationRun(code, timed_out, wall, run_dir, started_at, lines)


_ROUND_LINE = re.compile(r"round (\d+)/(\d+) \| train loss \S+ \| ([\d.]+) s")


def train_only_rounds(lines: list[tuple[float, str]]) -> dict[int, float]:
    """``{round: train seconds}`` of the rounds without evaluation, from the
    ServerApp's ``round r/N | train loss L | S s`` log lines (such rounds write
    no ``metrics.jsonl`` row)."""
    return {r: seconds for r, (seconds, _) in _train_only(lines).items()}


def round_logged_at(lines: list[tuple[float, str]], rnd: int) -> float | None:
    """When (seconds after the start) the line of train-only round ``rnd``
    arrived: just after that round ended."""
    found = _train_only(lines).get(rnd)
    return None if found is None else found[1]


def _train_only(lines: list[tuple[float, str]]) -> dict[int, tuple[float, float]]:
    found = {}
    for at, line in lines:
        match = _ROUND_LINE.search(line)
        if match:
            found[int(match.group(1))] = (float(match.group(3)), at)
    return found


#: Other jobs' share of the machine's CPU above which wall-clock figures of a
#: run are not those of this machine (they are inflated and their split skewed).
QUIET_LIMIT = 0.05


def cpu_rows(memory: dict[str, Any]) -> list[dict[str, Any]]:
    """CPU seconds per kind of process and their share of the run's CPU."""
    total = memory.get("total_cpu_s") or 0.0
    return [
        {"kind": kind, "cpu_s": k["cpu_s"], "share": k["cpu_s"] / total if total else 0}
        for kind, k in sorted(memory["kinds"].items(), key=lambda kv: -kv[1]["cpu_s"])
    ]


def contention_note(memory: dict[str, Any]) -> str:
    """One line on other jobs' CPU load during the run (a warning above
    :data:`QUIET_LIMIT`)."""
    cpu = memory.get("cpu")
    if not cpu:
        return "machine CPU time not read"
    line = (
        f"CPU over {cpu['elapsed_s']:.0f} s on {cpu['cpus']} cores: this run "
        f"{cpu['ours_cpu_share']:.0%}, other jobs {cpu['foreign_cpu_share']:.0%}"
    )
    if cpu["foreign_cpu_share"] > QUIET_LIMIT:
        line += (
            " -- NOT a quiet machine: wall-clock figures are inflated and the "
            "clients' own seconds include waiting for a core; rerun when idle"
        )
    return line
