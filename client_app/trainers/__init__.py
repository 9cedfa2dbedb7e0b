"""Client-side trainers, one module per strategy that trains differently."""

from . import hypernet  # noqa: F401  (registers "mh-pfedhn")
from .base import TRAINERS, ClientTrainer, build_trainer, register_trainer

__all__ = ["TRAINERS", "ClientTrainer", "build_trainer", "register_trainer"]
