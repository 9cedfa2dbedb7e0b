"""Running small torch computations on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    For the small server-side computations of the baselines (SVDs of weight
    matrices, prototype models of a few hundred rows): threads only add
    synchronisation there, and on a busy 2-core machine multi-threaded SVDs and
    FedTGP's server training were 20-40 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
