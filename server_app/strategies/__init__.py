"""Server strategies, one module per algorithm, registered by name.

``strategy = "<name>"`` in the run config selects one; a new algorithm is a new
module here whose class is decorated with :func:`register_strategy`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from common.config import ConfigError, RunConfig

STRATEGIES: dict[str, type] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a strategy selectable as ``strategy = name``."""

    def decorator(cls: type) -> type:
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' is registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return decorator


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def build_strategy(cfg: RunConfig):
    """The strategy named by ``cfg.strategy``, or a ConfigError listing the names."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"run-config key 'strategy' = {cfg.strategy!r} is not allowed: unknown "
            f"strategy; allowed: {', '.join(available_strategies())}"
        )
    return STRATEGIES[cfg.strategy].from_config(cfg)


# Import every module of this package so that its strategy registers itself.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
