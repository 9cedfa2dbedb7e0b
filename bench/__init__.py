"""Benchmarks that print their figures as a table and write them to JSON.

Run all with ``make bench``; each module also runs alone (``python -m bench.<name>``).
"""
