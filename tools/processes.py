"""Finding and stopping the processes a tool started (Linux ``/proc``).

Flower starts some of its children in sessions of their own (the SuperLink's
SuperExec, the simulation runtime and Ray, a SuperNode's ClientApps), so stopping
a process group is not enough: the tools look up every descendant first and stop
those that outlive their leader. A process is identified by ``(pid, start time)``,
so a PID reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: ``(pid, start time in clock ticks since boot)``.
Identity = tuple[int, str]


def proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def identities(pids: list[int]) -> list[Identity]:
    """The identities of those of ``pids`` that exist."""
    found = []
    for pid in pids:
        fields = proc_stat(pid)
        if fields is not None:
            found.append((pid, fields[19]))
    return found


def running(family: list[Identity]) -> list[int]:
    """PIDs of ``family`` that still run: same start time, not a zombie."""
    alive = []
    for pid, started in family:
        fields = proc_stat(pid)
        if fields is not None and fields[19] == started and fields[0] != "Z":
            alive.append(pid)
    return alive


def pgid(pid: int) -> int | None:
    """The process group of ``pid``, or None when it is gone."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def signal_group(group: int, sig: int) -> None:
    """Send ``sig`` to a process group; a group that is gone is ignored."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(group: int) -> bool:
    """Whether any process of the group still exists."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_family(family: list[Identity], grace: float = 5.0) -> None:
    """SIGTERM what still runs of ``family``, SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = running(family)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = running(family)
        if not alive:
            return
