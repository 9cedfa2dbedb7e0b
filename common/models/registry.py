"""The model registry: names to factories, and the counts the hypernetwork sizes by."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[[int, int], nn.Module]
"""Builds a model from ``(num_classes, in_channels)``."""

MODELS: dict[str, ModelFactory] = {}
"""Registry of model factories by name; extend it with :func:`register_model`."""

FEATURE_DIM = 64
"""Width of the penultimate representation returned by ``features``."""


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that adds a factory (or model class) to :data:`MODELS`.

    Parameters
    ----------
    name : str
        Registry key; must not be taken already.

    Returns
    -------
    Callable
        A decorator returning the factory unchanged.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Return the registered model names, in registration order."""
    return list(MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Instantiate a registered model.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    num_classes : int
        Output width of the classifier head.
    in_channels : int, default 3
        Input image channels (3 for colour, 1 for grey scale).

    Returns
    -------
    nn.Module
        The model, mapping ``[B, in_channels, 32, 32]`` to ``[B, num_classes]``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the allowed names.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        allowed = ", ".join(available_models())
        raise ValueError(f"unknown model {name!r}; allowed: {allowed}") from None
    return factory(num_classes, in_channels)


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars ``K`` of ``model`` (``requires_grad`` only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def num_chunks(num_params: int, chunk_size: int = 3072) -> int:
    """Number of hypernetwork chunks ``n = ceil(num_params / chunk_size)``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return -(-num_params // chunk_size)
