"""How torch's OpenMP threads wait: passive, unless the user chose otherwise.

torch's CPU kernels run on a GNU OpenMP (libgomp) thread pool. Between two
parallel regions an idle pool thread by default *spins* for about 300,000
iterations before it sleeps. That is free on an otherwise idle machine and costly
when the pool shares its cores with other busy processes (other simulated
ClientApps, the ServerApp): a spinning thread holds a core that the thread it
waits for needs, so every barrier waits for the scheduler.

libgomp reads the variable once, when torch is imported, so
:func:`prefer_passive_wait` must run before the first ``import torch`` of the
process; the ClientApp and ServerApp packages call it first thing (in a Flower
simulation worker or SuperNode process nothing imports torch before them). It
changes no result: the wait policy decides how threads wait, not how work is split.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set already; return whether
    it takes effect (``False`` when torch was imported before this call)."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return "torch" not in sys.modules
