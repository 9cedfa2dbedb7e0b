"""Split a dataset's sample indices among clients, as in PAPER.md "Data and evaluation".

Every function is a pure function of its arguments: the same ``(labels, num_clients,
seed, ...)`` always gives the same partition, in any process. Each returns one sorted
``int64`` index array per client (indices into ``labels``); the arrays are disjoint.

Pathological (:func:`pathological`)
    Each client holds ``k`` distinct classes and draws a weight ``w ~ U(0.4, 0.6)``
    for each of them. The samples of a class ``c`` (shuffled) are divided among the
    clients ``H_c`` holding it in proportion to their weights: client ``i`` in ``H_c``
    gets a contiguous run of length ``~ n_c * w_ic / sum_{j in H_c} w_jc`` (cut points
    ``floor(n_c * cumsum(w) / sum(w))``), so every sample of every held class is
    assigned. Classes are drawn exactly as the authors' reference code draws them:
    with ``np.random.RandomState(seed)``, each client in turn takes ``k`` distinct
    classes uniformly at random (``choice(C, k, replace=False)``), then each client
    draws its weights in the same order. So some classes may be held by several
    clients and some by none (their samples stay unused), and for the same seed the
    class sets equal the reference's (e.g. seed 42, 10 clients on CIFAR-10).

Dirichlet (:func:`dirichlet`)
    For each class ``c``: proportions ``p_c ~ Dir(alpha * 1_num_clients)``, cut points
    ``floor(n_c * cumsum(p_c))``; all classes are redrawn together until every client
    has at least ``min_size`` samples (PAPER.md: "more than 30", so 31).

Local split (:func:`split_train_test`)
    A client's indices, shuffled with a seed, are split 75/25 into local train/test.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DIRICHLET_MIN_SIZE",
    "SCHEMES",
    "dirichlet",
    "partition_indices",
    "pathological",
    "split_train_test",
]

SCHEMES = ("pathological", "dirichlet")
DIRICHLET_MIN_SIZE = 31  # PAPER.md: every client has "more than 30" samples
WEIGHT_LOW, WEIGHT_HIGH = 0.4, 0.6  # pathological per-class weights ~ U(0.4, 0.6)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D array, got shape {labels.shape}"
        )
    return labels


def _check_num_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")


def _cut_points(proportions: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Interior cut points ``floor(n * cumsum(p))[:-1]`` along the last axis.

    ``np.split(samples, cuts)`` then gives client ``i`` a run of length about
    ``n * p_i``; the last client takes the remainder, so all ``n`` samples are used.
    """
    cumulative = np.cumsum(proportions, axis=-1)
    return (cumulative * np.asarray(n)[..., None]).astype(np.int64)[..., :-1]


def _collect(chunks: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate and sort each client's chunks of indices."""
    return [
        np.sort(np.concatenate(c)).astype(np.int64) if c else np.empty(0, np.int64)
        for c in chunks
    ]


def pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID partition (see the module docstring for the procedure).

    Samples of classes nobody holds stay unassigned. Raises ``ValueError`` unless
    ``1 <= classes_per_client <= number of classes present in labels``.
    """
    labels = _as_labels(labels)
    _check_num_clients(num_clients)
    classes = np.unique(labels)
    k = classes_per_client
    if not 1 <= k <= len(classes):
        raise ValueError(
            f"classes_per_client must be between 1 and the number of classes "
            f"({len(classes)}), got {k}"
        )
    # The legacy generator and call order of the reference code (see docstring).
    rng = np.random.RandomState(seed)
    client_classes = [
        rng.choice(len(classes), size=k, replace=False) for _ in range(num_clients)
    ]
    client_weights = [
        np.array([rng.uniform(WEIGHT_LOW, WEIGHT_HIGH) for _ in range(k)])
        for _ in range(num_clients)
    ]

    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(len(classes)):
        owners = [i for i in range(num_clients) if c in client_classes[i]]
        if not owners:
            continue
        weights = np.array(
            [client_weights[i][list(client_classes[i]).index(c)] for i in owners]
        )
        samples = rng.permutation(np.flatnonzero(labels == classes[c]))
        cuts = _cut_points(weights / weights.sum(), len(samples))
        for i, part in zip(owners, np.split(samples, cuts), strict=True):
            chunks[i].append(part)
    return _collect(chunks)


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = DIRICHLET_MIN_SIZE,
    max_attempts: int = 10_000,
) -> list[np.ndarray]:
    """Dirichlet non-IID partition with full redraws until every client has
    ``min_size`` samples (see the module docstring); all samples are assigned.

    This is the procedure of ``flwr_datasets.partitioner.DirichletPartitioner`` with
    ``self_balancing=False`` (read in flwr-datasets 0.6.1): per class, in sorted class
    order, ``rng.dirichlet(alpha)`` with ``rng = np.random.default_rng(seed)``, the same
    floor-of-cumsum cut points, and a full redraw when a client is below the minimum.
    It is reimplemented rather than called because that class gives up after 11 draws
    (``ValueError``) and warns at every redraw, while a draw succeeds rarely for the
    paper's settings (simulated: CIFAR-10, 50 clients, alpha 0.1: 23% of draws, so 6%
    of seeds would fail; CIFAR-100, 100 clients, alpha 0.01: 3% of draws, 74% of seeds
    would fail). Here up to ``max_attempts`` draws are made. The random numbers are
    consumed in the same order, so the number of samples of each class each client
    gets is identical to flwr's whenever flwr succeeds (checked in the tests). One
    addition: the samples of a class are shuffled (after the accepted draw) before
    being cut, so that the order of the source files does not matter.

    Raises ``ValueError`` if ``num_clients * min_size`` exceeds the number of samples
    or if no draw reaches the minimum within ``max_attempts``.
    """
    labels = _as_labels(labels)
    _check_num_clients(num_clients)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(
            f"cannot give each of {num_clients} clients at least {min_size} samples: "
            f"the dataset has only {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_samples = [np.flatnonzero(labels == c) for c in classes]
    class_sizes = np.array([len(s) for s in class_samples])
    concentration = np.full(num_clients, float(alpha))
    best = 0
    for _ in range(max_attempts):
        # Row c is Dir(alpha) for class c; one call equals one call per class in order.
        cuts = _cut_points(rng.dirichlet(concentration, size=len(classes)), class_sizes)
        bounds = np.concatenate(
            [np.zeros((len(classes), 1), np.int64), cuts, class_sizes[:, None]], axis=1
        )
        smallest = int(np.diff(bounds, axis=1).sum(axis=0).min())
        if smallest >= min_size:
            break
        best = max(best, smallest)
    else:
        raise ValueError(
            f"Dirichlet partition (alpha={alpha}) of {len(labels)} samples in "
            f"{len(classes)} classes: no draw in {max_attempts} gave all {num_clients} "
            f"clients at least {min_size} samples (best smallest client: {best}). "
            "Use fewer clients, a larger alpha or a smaller minimum size."
        )
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for samples, class_cuts in zip(class_samples, cuts, strict=True):
        for i, part in enumerate(np.split(rng.permutation(samples), class_cuts)):
            chunks[i].append(part)
    return _collect(chunks)


def split_train_test(
    indices: np.ndarray, seed: int, train_fraction: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``indices`` with ``seed``; the first ``floor(train_fraction * n)`` are
    the local train set, the rest the local test set. Both are returned sorted."""
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    shuffled = np.random.default_rng(seed).permutation(
        np.asarray(indices, dtype=np.int64)
    )
    n_train = math.floor(train_fraction * len(shuffled) + 1e-9)
    return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    classes_per_client: int | None,
    dirichlet_alpha: float | None,
    dirichlet_min_size: int = DIRICHLET_MIN_SIZE,
) -> list[np.ndarray]:
    """Partition by ``scheme``: ``"pathological"`` uses ``classes_per_client``,
    ``"dirichlet"`` uses ``dirichlet_alpha`` and ``dirichlet_min_size`` (the paper's
    minimum is 31 samples); the parameters of the other scheme are ignored."""
    if scheme == "pathological":
        if classes_per_client is None:
            raise ValueError("the pathological partition needs classes_per_client")
        return pathological(labels, num_clients, classes_per_client, seed)
    if scheme == "dirichlet":
        if dirichlet_alpha is None:
            raise ValueError("the dirichlet partition needs dirichlet_alpha")
        return dirichlet(labels, num_clients, dirichlet_alpha, seed, dirichlet_min_size)
    raise ValueError(
        f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}"
    )
