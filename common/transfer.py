"""How a flat vector and its update travel (run-config ``transfer``).

MH-pFedHN and MH-pFedHNGD send client ``i`` a flat vector ``theta`` of ``K``
values and get back ``delta = theta - theta_trained`` (``K`` values); MH-pFedHNGD
does the same for the global model (``global-theta`` / ``global-delta``). Both
apps read the same run config, so the messages do not name the encoding. With
base key ``<key>`` (:data:`common.protocol.THETA`, :data:`~common.protocol.DELTA`,
...) the ``arrays`` record carries:

======  ============================  =========================================
mode    down (server -> client)       up (client -> server)
======  ============================  =========================================
fp32    ``<key>``: float32 ``[K]``    ``<key>``: float32 ``[K]``
fp16    ``<key>``: float16 ``[K]``    ``<key>``: float16 ``[K]``
topk    ``<key>``: float32 ``[K]``    ``<key>-indices``: int32 ``[n]``,
                                      ``<key>-values``: float32 ``[n]``
======  ============================  =========================================

``fp16``
    Round to nearest float16: relative error at most ``2**-11`` for
    ``|x| >= 2**-14``, absolute error at most ``2**-25`` below. Finite values
    beyond the float16 range are clipped to ``+-65504`` (:data:`FP16_MAX`): a
    plain cast would make them ``+-inf`` and the server rejects any reply holding
    non-finite numbers, so one huge entry would discard a whole update. NaN and
    ``+-inf`` stay as they are, so a diverged client is rejected exactly as with
    fp32. The client trains from the received vector cast to float32 and sends
    ``delta = float32(theta_fp16) - theta_trained``; the server keeps everything in
    float32 and casts the delta back before its hypernetwork step.
``topk``
    The ``n <= k`` entries of largest magnitude, ``k = ceil(topk-fraction * K)``
    (:func:`topk_count`): indices strictly increasing in ``[0, K)``, values the
    exact float32 entries. The server rebuilds the dense float32 delta with
    zeros elsewhere. The client sends exactly ``k`` entries (ties at the k-th
    magnitude broken arbitrarily but deterministically); fewer are accepted.

The receiving side accepts any floating dtype for dense vectors and values and
any integer dtype for indices (a wider one only costs bytes) and returns float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from common.protocol import sparse_keys

Mode = Literal["fp32", "fp16", "topk"]
MODES: tuple[Mode, ...] = ("fp32", "fp16", "topk")
#: Largest finite float16.
FP16_MAX = float(np.finfo(np.float16).max)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown transfer mode {mode!r}; allowed: {', '.join(MODES)}")


def topk_count(length: int, fraction: float) -> int:
    """``k = ceil(fraction * length)``, between 1 and ``length`` (0 if empty).

    The product is taken with a relative tolerance of ``1e-9``, so that e.g.
    ``0.1 * 70`` (``7.000000000000001`` in floating point) gives 7, not 8.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    if length <= 0:
        return 0
    return min(length, max(1, math.ceil(fraction * length * (1.0 - 1e-9))))


def encode_dense(x: np.ndarray, mode: Mode) -> np.ndarray:
    """A float vector as sent down: float16 under ``fp16`` (finite values clipped
    to ``+-FP16_MAX``), else float32 (no copy when ``x`` is float32 already)."""
    _check_mode(mode)
    x = np.asarray(x)
    if mode != "fp16":
        return np.ascontiguousarray(x, dtype=np.float32)
    clipped = np.where(np.isfinite(x), np.clip(x, -FP16_MAX, FP16_MAX), x)
    return np.ascontiguousarray(clipped, dtype=np.float16)


def decode_dense(x: np.ndarray) -> np.ndarray:
    """A received dense vector as float32 (any floating dtype is accepted)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a floating-point vector, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def check_dense(
    value: np.ndarray, name: str, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """``value`` as float32 if it is floating, of ``shape`` (when given) and finite.

    Raises
    ------
    ValueError
        Naming the array ``name`` and what was wrong.
    """
    if not np.issubdtype(value.dtype, np.floating) or (
        shape is not None and value.shape != shape
    ):
        expected = f"shape {shape}" if shape is not None else "any shape"
        raise ValueError(
            f"array '{name}' has shape {value.shape} and dtype {value.dtype}; "
            f"expected {expected}, floating"
        )
    if not np.isfinite(value).all():
        raise ValueError(f"array '{name}' holds NaN or Inf")
    return value.astype(np.float32, copy=False)


def update_keys(key: str, mode: Mode) -> tuple[str, ...]:
    """Names of the arrays that carry an update under base key ``key``."""
    _check_mode(mode)
    return sparse_keys(key) if mode == "topk" else (key,)


def encode_update(
    delta: np.ndarray, key: str, mode: Mode, fraction: float = 1.0
) -> dict[str, np.ndarray]:
    """The arrays that send ``delta`` up, keyed by their names in the record.

    ``fp32`` / ``fp16``: ``{key: delta}`` as float32 / float16 (see
    :func:`encode_dense`). ``topk``: ``{key-indices: int32, key-values: float32}``,
    the ``topk_count(len(delta), fraction)`` entries of largest magnitude in
    increasing index order (NaN and Inf count as largest, so a diverged update is
    still sent and rejected by the server).
    """
    if mode != "topk":
        return {key: encode_dense(delta, mode)}
    delta = np.asarray(delta, dtype=np.float32).reshape(-1)
    length = delta.size
    if length > np.iinfo(np.int32).max:
        raise ValueError(f"{length} values do not fit int32 indices")
    k = topk_count(length, fraction)
    magnitude = np.abs(delta)
    magnitude[np.isnan(delta)] = np.inf  # argpartition: NaN must count as largest
    chosen = np.argpartition(magnitude, length - k)[length - k :] if k else []
    indices = np.sort(np.asarray(chosen, dtype=np.int64)).astype(np.int32)
    index_key, value_key = sparse_keys(key)
    return {index_key: indices, value_key: delta[indices]}


def _vector(
    arrays: Mapping[str, np.ndarray], name: str, key: str, mode: Mode
) -> np.ndarray:
    if name not in arrays:
        expected = " and ".join(f"'{n}'" for n in update_keys(key, mode))
        raise ValueError(
            f"no array '{name}': run-config transfer = '{mode}' sends {expected}"
        )
    value = np.asarray(arrays[name])
    if value.ndim != 1:
        raise ValueError(f"array '{name}' must be 1-D, got shape {value.shape}")
    return value


def decode_update(
    arrays: Mapping[str, np.ndarray],
    key: str,
    length: int,
    mode: Mode,
    fraction: float = 1.0,
) -> np.ndarray:
    """The dense float32 update of ``length`` values that ``arrays`` carry.

    ``arrays`` maps the received array names to their values (only the names of
    :func:`update_keys` are read). Sparse replies are rebuilt with zeros where no
    index is sent. The norm limit (``max-delta-norm``) is the caller's policy.

    Raises
    ------
    ValueError
        Naming what was wrong: a missing array, a wrong dtype or shape, NaN or
        Inf, and for ``topk`` indices and values of different lengths, more than
        ``k`` entries, indices outside ``[0, length)``, duplicate or not strictly
        increasing indices.
    """
    _check_mode(mode)
    if mode != "topk":
        return check_dense(_vector(arrays, key, key, mode), key, (length,))
    index_key, value_key = sparse_keys(key)
    indices = _vector(arrays, index_key, key, mode)
    values = _vector(arrays, value_key, key, mode)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"array '{index_key}' has dtype {indices.dtype}; expected integers (int32)"
        )
    values = check_dense(values, value_key)
    if indices.size != values.size:
        raise ValueError(
            f"arrays '{index_key}' and '{value_key}' differ in length "
            f"({indices.size} != {values.size})"
        )
    k = topk_count(length, fraction)
    if indices.size > k:
        raise ValueError(
            f"{indices.size} sparse entries in '{value_key}'; at most k = {k} "
            f"(ceil({fraction} * {length}))"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= length):
        raise ValueError(
            f"array '{index_key}' holds indices outside [0, {length}) "
            f"(min {indices.min()}, max {indices.max()})"
        )
    steps = np.diff(indices.astype(np.int64))
    if (steps == 0).any():
        raise ValueError(f"array '{index_key}' holds duplicate indices")
    if (steps < 0).any():
        raise ValueError(f"array '{index_key}' is not sorted in increasing order")
    dense = np.zeros(length, np.float32)
    dense[indices] = values
    return dense
