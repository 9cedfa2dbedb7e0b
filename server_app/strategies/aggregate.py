"""Aggregation rules the baselines share (pure NumPy, unit-tested on tiny inputs).

- :func:`weighted_mean`: ``sum_i w_i a_i / sum_i w_i`` (FedAvg and its kin);
- :func:`class_mean`: per class, the mean of the rows of the clients that hold the
  class (prototypes and per-class logits); clients without the class are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i a_i / sum_i w_i`` over same-shaped arrays, in float64 then float32.

    Raises
    ------
    ValueError
        On no arrays, a shape mismatch, or weights that do not sum to > 0.
    """
    if not arrays:
        raise ValueError("weighted_mean of no arrays")
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"arrays differ in shape: {sorted({a.shape for a in arrays})}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),) or not w.sum() > 0:
        raise ValueError(f"weights {weights} must be one per array and sum to > 0")
    total = np.zeros(shape, dtype=np.float64)
    for a, wi in zip(arrays, w, strict=True):
        total += wi * a
    return (total / w.sum()).astype(np.float32)


def class_mean(
    tables: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    weighted: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean of client tables, over the clients that hold each class.

    Parameters
    ----------
    tables : sequence of np.ndarray
        One ``[C, D]`` array per client: row ``c`` is the client's value for
        class ``c`` (a prototype, mean logits).
    counts : sequence of np.ndarray
        One ``[C]`` array per client: examples behind each row; 0 means the
        client does not hold the class and its row is ignored.
    weighted : bool
        ``False``: each holding client counts once (HtFLlib's prototype
        aggregation); ``True``: rows are weighted by their counts.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``[C, D]`` float32 means (zero rows for classes nobody holds) and a
        ``[C]`` boolean mask of the classes somebody holds.
    """
    if not tables:
        raise ValueError("class_mean of no tables")
    stack = np.stack([np.asarray(t, dtype=np.float64) for t in tables])
    held = np.stack([np.asarray(c, dtype=np.float64) for c in counts])
    if held.shape != stack.shape[:2]:
        raise ValueError(
            f"counts of shape {held.shape[1:]} do not match tables {stack.shape[1:]}"
        )
    w = held if weighted else (held > 0).astype(np.float64)
    total = w.sum(axis=0)
    present = total > 0
    means = np.einsum("kc,kcd->cd", w, stack)
    means[present] /= total[present, None]
    return means.astype(np.float32), present
