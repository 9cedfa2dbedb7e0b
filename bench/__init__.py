"""Benchmarks that print their figures as a table and write them to JSON.

Run all with ``make bench``; each module also runs alone (``python -m bench.<name>``).
In-process torch work (the sequential loop of ``bench.round``, ``bench.hypernet``)
waits as the apps do (:func:`common.openmp.prefer_passive_wait`).
"""

from common.openmp import prefer_passive_wait

prefer_passive_wait()
