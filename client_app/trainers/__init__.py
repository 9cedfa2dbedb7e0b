"""Client-side trainers, one module per strategy that trains differently."""

from . import hypernet, hypernet_gd  # noqa: F401  (register themselves)
from .base import TRAINERS, ClientTrainer, build_trainer, register_trainer

__all__ = ["TRAINERS", "ClientTrainer", "build_trainer", "register_trainer"]
