"""Moved to :mod:`tools.superlink` (product code); re-exported for old imports."""

from tools.superlink import (  # noqa: F401
    APP,
    BIN,
    SimulationSuperLink,
    as_overrides,
    free_port,
)
