"""What machine a figure was measured on.

Runs of one comparison table span sessions, and sessions of a shared fleet do not
always land on the same hardware: the same 5-model run took 67.5 s per round on one
host and 45 s on another, and float results differ between CPUs whose kernels
differ (AVX2, AVX-512, AMX). Benchmarks and run records therefore store these facts
beside their numbers, so a reader can tell which figures share a machine.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The processor's marketing name (``model name`` of /proc/cpuinfo).

    Falls back to :func:`platform.processor`, then to the architecture, where
    /proc/cpuinfo is missing (macOS, Windows) or names no model (some ARM hosts).
    """
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The facts that make figures comparable (or not) between machines.

    ``cpu_capability`` is the vector instruction set torch's CPU kernels run with
    (``DEFAULT``, ``AVX2``, ``AVX512``, ...); ``cpus`` the logical CPUs this
    process may use; ``threads`` torch's intra-op threads in this process;
    ``cuda`` the first GPU's name, or ``None``.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": _version("flwr"),
        "threads": torch.get_num_threads(),
        "cpus": cpus,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe(facts: dict[str, Any]) -> str:
    """One short line for a table, e.g. ``2 CPUs, Intel Xeon (AVX512)``."""
    text = f"{facts.get('cpus', '?')} CPUs, {facts.get('cpu') or '?'}"
    if facts.get("cpu_capability"):
        text += f" ({facts['cpu_capability']})"
    if facts.get("cuda"):
        text += f", {facts['cuda']}"
    return text


def record_machine(run_dir: Path) -> None:
    """Write ``<run_dir>/machine.json``: a list of starts, each ``from_round`` and
    :func:`machine` (one start: a comparison never resumes a run, it reruns it).

    Written by the launcher on the host that ran the simulation, so a table that
    joins records of several sessions can say which rows share a machine.
    """
    entry = {"from_round": 0, **machine()}
    (run_dir / "machine.json").write_text(json.dumps([entry], indent=2) + "\n")
