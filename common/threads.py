"""Running torch computations on a chosen number of intra-op threads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` intra-op threads inside the block (restored after);
    ``0`` leaves the process's setting as it is."""
    threads = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count > 0:
            torch.set_num_threads(threads)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    For the small server-side computations of the baselines (SVDs of weight
    matrices, prototype models of a few hundred rows): threads only add
    synchronisation there, and on a busy 2-core machine multi-threaded SVDs and
    FedTGP's server training were 20-40 times slower.
    """
    with intra_op_threads(1):
        yield
