"""Chunk heads: the maps from extractor features to a client's chunks.

A head holds the ``n`` position maps for one chunk count ``n``; clients with the
same chunk count share it (heads are keyed by chunk count, never by arrival order).
The ``n`` maps are stored as one ``(n, C, h)`` tensor and applied as one batched
matrix product, which equals ``n`` separate ``nn.Linear(h, C)`` modules (tested).
Per-position maps are initialised like ``nn.Linear``: ``U(-1/sqrt(h), 1/sqrt(h))``.

Compact heads (``head-type``; not in the paper). The per-position head costs
``n C (h + 1)`` parameters, about 129 times the client model it generates, which
makes the paper's five models a 250 M parameter hypernetwork. Two alternatives
generate the same chunk layout from far fewer parameters:

``shared``
    One map for all positions: ``chunk_j = W f_j + b[j]`` with ``W: (C, h)``
    shared by the head and ``b[j]: (C,)`` per position. ``b`` is a learned
    *position embedding* in chunk space (it tells the positions apart, together
    with the client's own embedding rows ``v_i[j]``) and equals a base model that
    every client of the architecture shares. ``C h + n C`` parameters.
``low-rank``
    Per-position maps of rank ``r`` (``head-rank``) sharing their input
    projection: ``chunk_j = A[j] (B f_j) + b[j]`` with ``A[j]: (C, r)`` and
    ``B: (r, h)``. ``n C (r + 1) + r h`` parameters. ``A`` is initialised from
    ``U(-sqrt(3/r), sqrt(3/r))`` and ``B`` like ``nn.Linear(h, r)``, so the
    entries of ``A[j] B`` have the variance of a per-position map's.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

HeadType = Literal["per-position", "shared", "low-rank"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)


def check_head_type(head_type: str) -> None:
    """Raise ``ValueError`` naming the allowed types if ``head_type`` is unknown."""
    if head_type not in HEAD_TYPES:
        raise ValueError(
            f"unknown head type {head_type!r}; allowed: {', '.join(HEAD_TYPES)}"
        )


class ChunkHead(nn.Module):
    """Maps the extractor's ``(n, h)`` features of a client to its ``(n, C)`` chunks.

    Subclasses implement :meth:`forward`; :meth:`accumulate_grad` is the VJP of it
    (autograd by default).
    """

    def accumulate_grad(
        self, grad_out: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Add the VJP with ``grad_out`` to the parameters' ``.grad`` (those that
        require it); return the gradient w.r.t. ``features``."""
        with torch.enable_grad():
            features = features.detach().requires_grad_(True)
            self(features).backward(grad_out)
        return features.grad


def _uniform(shape: tuple[int, ...], bound: float, generator) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator))


class PositionHeads(ChunkHead):
    """``n`` independent linear maps ``R^h -> R^C``, one per chunk position.

    ``forward(F)[j] = weight[j] @ F[j] + bias[j]`` for ``F`` of shape ``(n, h)``,
    computed with one ``baddbmm`` instead of a loop over ``n`` modules.
    """

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_dim)
        shape = (num_positions, chunk_size, hidden_dim)
        self.weight = _uniform(shape, bound, generator)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)
        self._grad_buffer: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``(n, h)`` features to ``(n, C)`` chunks, row ``j`` through map ``j``."""
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, features.unsqueeze(2))
        return out.squeeze(2)

    @torch.no_grad()
    def accumulate_grad(
        self, grad_out: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Add this head's VJP to ``.grad``; return the gradient w.r.t. features.

        For ``out[j] = W[j] f[j] + b[j]`` and output gradient ``g`` (``(n, C)``)::

            dW[j] = g[j] f[j]^T,   db[j] = g[j],   df[j] = W[j]^T g[j]

        This equals autograd of :meth:`forward` (tested) but writes ``dW`` into a
        buffer kept between steps: autograd would allocate a fresh ``(n, C, h)``
        tensor per reply, and on the CPU those page faults cost more than the
        arithmetic. ``.grad`` is set only while a step uses this head, so Adam
        still skips heads that no reply touched.
        """
        if not self.weight.requires_grad:  # a frozen head (novel-client phase)
            return torch.bmm(grad_out.unsqueeze(1), self.weight).squeeze(1)
        outer = (grad_out.unsqueeze(2), features.unsqueeze(1))
        if self.weight.grad is None:
            if (
                self._grad_buffer is None
                or self._grad_buffer.device != self.weight.device
            ):
                self._grad_buffer = torch.empty_like(self.weight)
            self.weight.grad = torch.mul(*outer, out=self._grad_buffer)
            self.bias.grad = grad_out.clone()
        else:
            self.weight.grad.addcmul_(*outer)
            self.bias.grad.add_(grad_out)
        return torch.bmm(grad_out.unsqueeze(1), self.weight).squeeze(1)


class SharedHead(ChunkHead):
    """``head-type = "shared"``: ``chunk_j = W f_j + b[j]`` (one ``W`` per head)."""

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden_dim)
        self.weight = _uniform((chunk_size, hidden_dim), bound, generator)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, features, self.weight.t())


class LowRankHeads(ChunkHead):
    """``head-type = "low-rank"``: ``chunk_j = A[j] (B f_j) + b[j]``, rank ``r``."""

    def __init__(
        self,
        num_positions: int,
        hidden_dim: int,
        chunk_size: int,
        rank: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.project = _uniform(
            (rank, hidden_dim), 1 / math.sqrt(hidden_dim), generator
        )
        self.weight = _uniform(
            (num_positions, chunk_size, rank), math.sqrt(3 / rank), generator
        )
        bound = 1.0 / math.sqrt(hidden_dim)
        self.bias = _uniform((num_positions, chunk_size), bound, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        low = features @ self.project.t()  # (n, r)
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, low.unsqueeze(2))
        return out.squeeze(2)


def make_head(
    head_type: HeadType,
    num_positions: int,
    hidden_dim: int,
    chunk_size: int,
    rank: int = 8,
    generator: torch.Generator | None = None,
) -> ChunkHead:
    """The head of ``head_type`` for ``num_positions`` chunks (module docstring)."""
    check_head_type(head_type)
    if head_type == "per-position":
        return PositionHeads(num_positions, hidden_dim, chunk_size, generator)
    if head_type == "shared":
        return SharedHead(num_positions, hidden_dim, chunk_size, generator)
    return LowRankHeads(num_positions, hidden_dim, chunk_size, rank, generator)


def head_parameter_count(
    head_type: HeadType,
    num_positions: int,
    hidden_dim: int,
    chunk_size: int,
    rank: int = 8,
) -> int:
    """Parameters of one head, without building it (module docstring's formulas)."""
    check_head_type(head_type)
    n, h, c = num_positions, hidden_dim, chunk_size
    if head_type == "per-position":
        return n * c * (h + 1)
    if head_type == "shared":
        return c * h + n * c
    return n * c * (rank + 1) + rank * h
