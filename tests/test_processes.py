"""tools.processes: finding a process tree in /proc and stopping it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tools import processes


def test_descendants_are_found_and_stopped_even_outside_the_group():
    # bash -> python (a session of its own, as Flower's SuperExec) -> sleep
    code = (
        "import subprocess, time; "
        "subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)"
    )
    leader = subprocess.Popen(
        ["bash", "-c", f'{sys.executable} -c "{code}" & wait'],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while len(processes.descendants(leader.pid)) < 2:
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.1)
        family = processes.identities([leader.pid, *processes.descendants(leader.pid)])
        assert len(family) == 3
        groups = {processes.pgid(pid) for pid, _ in family}
        assert len(groups) == 2  # the sleep runs in a session (group) of its own
        assert all(processes.group_alive(group) for group in groups)
        processes.signal_group(leader.pid, 15)
        leader.wait(timeout=10)
        assert processes.running(family)  # the other session's sleep outlives it
        processes.stop_family(family)
        assert processes.running(family) == []  # zombies (not yet reaped) excluded
    finally:
        leader.kill()


def test_a_reused_pid_is_not_taken_for_the_process_that_had_it():
    pid = os.getpid()
    ((_, started),) = processes.identities([pid])
    assert processes.running([(pid, started)]) == [pid]
    assert processes.running([(pid, str(int(started) + 1))]) == []
    assert processes.identities([2**22 + 7]) == []  # above pid_max: no such process
