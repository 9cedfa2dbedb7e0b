"""Command-line tools that drive the app through real Flower processes.

``tools.superlink`` starts a private simulation SuperLink and submits runs to it
with ``flwr run``; ``tools.compare`` runs a preset of strategies x seeds through it
and writes a comparison table and plot (``python -m tools.compare PRESET``).
"""
