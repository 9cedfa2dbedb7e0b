"""Client-side trainers, one module per strategy that trains differently.

Every module of this package is imported here, and registers its trainer with
:func:`~client_app.trainers.base.register_trainer`; a new strategy's trainer is
one new file.
"""

import importlib
import pkgutil

from .base import (
    TRAINERS,
    ClientTrainer,
    PersonalTrainer,
    build_trainer,
    register_trainer,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TRAINERS",
    "ClientTrainer",
    "PersonalTrainer",
    "build_trainer",
    "register_trainer",
]
