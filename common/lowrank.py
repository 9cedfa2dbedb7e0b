"""FedKD's communication compression: truncated SVD of each weight matrix.

Used by both sides of ``fedkd`` (server: :mod:`server_app.strategies.fedkd`,
client: :mod:`client_app.trainers.fedkd`), which both know the shared model's
architecture (run-config ``global-model``) and therefore the shapes of its
trainable parameters in ``named_parameters()`` order (:func:`param_shapes`).

Encoding a flat parameter vector with energy fraction ``e``, tensor by tensor:

- a tensor with at least 2 dimensions and ``shape[0] > 1`` is a matrix
  ``W`` of ``m = shape[0]`` rows and ``n = prod(shape[1:])`` columns (a
  convolution kernel ``[out, in, kh, kw]`` becomes ``[out, in * kh * kw]``).
  With ``W = U diag(s) V^T`` (``s`` descending), its rank is the smallest ``k``
  with ``sum_{j<=k} s_j^2 > e * sum_j s_j^2`` (:func:`energy_rank`), and it
  travels as ``U[:, :k]`` (``m*k``), ``s[:k]`` (``k``) and ``V^T[:k]``
  (``k*n``) -- when that is fewer values than ``m*n``; otherwise dense;
- every other tensor (biases, BatchNorm affine parameters) travels dense.

On the wire: :data:`FACTORS` (float32, all tensors' values concatenated in
parameter order, each matrix as ``U_k`` row-major, then ``s_k``, then ``V_k^T``
row-major) and :data:`RANKS` (int32 ``[T]``, one per parameter tensor: ``k >= 1``
for a factored matrix, 0 for a dense tensor). The receiver rebuilds
``W_k = U_k diag(s_k) V_k^T``; ``||W - W_k||_F^2 = sum_{j>k} s_j^2 <=
(1 - e) ||W||_F^2``.

The energy grows linearly over the rounds (:func:`energy_at`), from
``fedkd-energy-start`` at round 1 to ``fedkd-energy-end`` at the last round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .threads import one_thread

#: Array names of an encoded vector (see the module docstring).
FACTORS = "shared-factors"
RANKS = "shared-ranks"

Shape = tuple[int, ...]


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``(U, s, V^T)`` in float64 (PyTorch's LAPACK, one thread)."""
    with one_thread():
        u, s, vt = torch.linalg.svd(
            torch.from_numpy(np.asarray(matrix, dtype=np.float64)),
            full_matrices=False,
        )
    return u.numpy(), s.numpy(), vt.numpy()


def _product(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``U diag(s) V^T`` in float64 (one thread, as :func:`_svd`)."""
    with one_thread():
        out = (torch.from_numpy(u) * torch.from_numpy(s)) @ torch.from_numpy(vt)
    return out.numpy()


def param_shapes(model: nn.Module) -> list[Shape]:
    """Shapes of ``model``'s trainable parameters in ``named_parameters()`` order
    (the order of :func:`common.flat.flatten_params`)."""
    return [tuple(p.shape) for _, p in model.named_parameters() if p.requires_grad]


def energy_at(server_round: int, num_rounds: int, start: float, end: float) -> float:
    """The energy fraction of ``server_round`` (1-based): ``start`` at round 1,
    ``end`` at round ``num_rounds``, linear in between (HtFLlib's schedule
    ``T_start + i / G * (T_end - T_start)`` for its rounds ``i = 0..G``)."""
    if num_rounds <= 1:
        return float(start)
    frac = min(max((server_round - 1) / (num_rounds - 1), 0.0), 1.0)
    return float(start + frac * (end - start))


def energy_rank(sigma: np.ndarray, energy: float) -> int:
    """Smallest ``k >= 1`` whose top singular values hold more than ``energy`` of
    ``sum sigma^2`` (all of them when none does, e.g. ``energy = 1``)."""
    sq = np.square(np.asarray(sigma, dtype=np.float64))
    cumulative = np.cumsum(sq)
    k = int(np.searchsorted(cumulative, energy * cumulative[-1], side="right")) + 1
    return min(k, len(sq))


def matrix_shape(shape: Shape) -> tuple[int, int] | None:
    """``(m, n)`` of the matrix a tensor of ``shape`` is decomposed as, or None."""
    if len(shape) < 2 or shape[0] <= 1:
        return None
    return shape[0], int(np.prod(shape[1:]))


def compress(
    vector: np.ndarray, shapes: Sequence[Shape], energy: float
) -> tuple[np.ndarray, np.ndarray]:
    """Encode a flat parameter vector: ``(factors float32, ranks int32)``."""
    vector = np.asarray(vector, dtype=np.float32)
    sizes = [int(np.prod(s)) for s in shapes]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(
            f"vector of shape {vector.shape} does not hold {sum(sizes)} parameters"
        )
    parts: list[np.ndarray] = []
    ranks: list[int] = []
    offset = 0
    for shape, size in zip(shapes, sizes, strict=True):
        values = vector[offset : offset + size]
        offset += size
        mat = matrix_shape(shape)
        if mat is not None:
            m, n = mat
            u, s, vt = _svd(values.reshape(m, n))
            k = energy_rank(s, energy)
            if k * (m + n + 1) < m * n:
                parts += [u[:, :k].ravel(), s[:k], vt[:k].ravel()]
                ranks.append(k)
                continue
        parts.append(values)
        ranks.append(0)
    factors = np.concatenate(parts) if parts else np.zeros(0)
    return factors.astype(np.float32), np.asarray(ranks, dtype=np.int32)


def decompress(
    factors: np.ndarray, ranks: np.ndarray, shapes: Sequence[Shape]
) -> np.ndarray:
    """Rebuild the flat float32 vector from :func:`compress`'s output.

    Raises
    ------
    ValueError
        On ranks that are not integers, one per tensor, and within
        ``[0, min(m, n)]`` (0 for tensors that are not matrices), or on a
        ``factors`` length that does not match them.
    """
    ranks = np.asarray(ranks)
    factors = np.asarray(factors)
    if not np.issubdtype(ranks.dtype, np.integer) or ranks.shape != (len(shapes),):
        raise ValueError(
            f"ranks must be {len(shapes)} integers, got shape {ranks.shape} and "
            f"dtype {ranks.dtype}"
        )
    if factors.ndim != 1 or not np.issubdtype(factors.dtype, np.floating):
        raise ValueError(f"factors must be a floating vector, got {factors.shape}")
    out: list[np.ndarray] = []
    offset = 0

    def take(count: int) -> np.ndarray:
        nonlocal offset
        if offset + count > factors.size:
            raise ValueError(f"factors hold {factors.size} values; more are needed")
        chunk = factors[offset : offset + count]
        offset += count
        return chunk.astype(np.float64)

    for index, (shape, k) in enumerate(zip(shapes, ranks.tolist(), strict=True)):
        size = int(np.prod(shape))
        mat = matrix_shape(shape)
        if k == 0:
            out.append(take(size))
            continue
        if mat is None or not 1 <= k <= min(mat):
            raise ValueError(f"rank {k} is not allowed for tensor {index} of {shape}")
        m, n = mat
        u = take(m * k).reshape(m, k)
        s = take(k)
        vt = take(k * n).reshape(k, n)
        out.append(_product(u, s, vt).ravel())
    if offset != factors.size:
        raise ValueError(f"factors hold {factors.size} values; {offset} expected")
    if not out:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(out).astype(np.float32)
