"""Flat parameter vectors and BatchNorm buffer state.

The hypernetwork generates one 1-D vector ``theta`` of length ``K`` per client: all
trainable parameters (``requires_grad``) concatenated in ``named_parameters()``
order, each flattened row-major. :func:`flatten_params` and :func:`load_flat_`
convert between a model and that vector.

Buffers (BatchNorm ``running_mean``, ``running_var``, ``num_batches_tracked``) are
not generated: they stay on the client and persist across rounds through
:func:`buffer_state` and :func:`load_buffer_state_`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of ``model`` in ``named_parameters()`` order."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flatten_params(model: nn.Module) -> torch.Tensor:
    """Concatenate the trainable parameters into one vector.

    Parameters
    ----------
    model : nn.Module
        Source model.

    Returns
    -------
    torch.Tensor
        Detached float32 copy of shape ``[K]``, on the parameters' device.
    """
    params = trainable_params(model)
    if not params:
        return torch.empty(0, dtype=torch.float32)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return flat.to(torch.float32)


def load_flat_(model: nn.Module, flat: torch.Tensor | np.ndarray) -> None:
    """Write a flat vector into the trainable parameters of ``model``, in place.

    Parameters
    ----------
    model : nn.Module
        Target model; its parameters are overwritten under ``torch.no_grad()``.
    flat : torch.Tensor or np.ndarray
        Floating-point vector of shape ``[K]`` with ``K = num_trainable(model)``.
        A NumPy array is wrapped without copying; values are cast to each
        parameter's dtype and device slice by slice.

    Raises
    ------
    ValueError
        If ``flat`` is not 1-D, not floating point, or its length is not ``K``.
    """
    if isinstance(flat, np.ndarray):
        if not np.issubdtype(flat.dtype, np.floating):
            raise ValueError(f"flat vector must be floating point, got {flat.dtype}")
        flat = torch.from_numpy(np.ascontiguousarray(flat))
    if not flat.is_floating_point():
        raise ValueError(f"flat vector must be floating point, got {flat.dtype}")
    if flat.dim() != 1:
        raise ValueError(f"flat vector must be 1-D, got shape {tuple(flat.shape)}")
    params = trainable_params(model)
    expected = sum(p.numel() for p in params)
    if flat.numel() != expected:
        raise ValueError(
            f"flat vector length mismatch: expected {expected}, received {flat.numel()}"
        )
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def buffer_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy all buffers of ``model`` (e.g. BatchNorm statistics) to NumPy.

    Returns
    -------
    dict of str to np.ndarray
        ``named_buffers()`` name -> CPU copy with the buffer's shape and dtype.
    """
    return {name: b.detach().cpu().numpy().copy() for name, b in model.named_buffers()}


def load_buffer_state_(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Write a :func:`buffer_state` mapping back into ``model``'s buffers, in place.

    Parameters
    ----------
    model : nn.Module
        Target model.
    state : mapping of str to np.ndarray
        Exactly the model's buffer names, each with the buffer's shape.

    Raises
    ------
    ValueError
        On a missing or unexpected name, or a shape mismatch.
    """
    buffers = dict(model.named_buffers())
    missing = sorted(buffers.keys() - state.keys())
    unexpected = sorted(state.keys() - buffers.keys())
    if missing or unexpected:
        raise ValueError(
            f"buffer names differ: missing {missing}, unexpected {unexpected}"
        )
    for name, b in buffers.items():
        value = np.asarray(state[name])
        if value.shape != tuple(b.shape):
            raise ValueError(
                f"buffer {name!r} shape mismatch: expected {tuple(b.shape)}, "
                f"received {value.shape}"
            )
    with torch.no_grad():
        for name, b in buffers.items():
            b.copy_(torch.as_tensor(np.asarray(state[name])))
