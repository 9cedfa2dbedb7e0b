"""Partitions of PAPER.md: pathological, Dirichlet and the 75/25 local split."""

from __future__ import annotations

import numpy as np
import pytest

from common.partition import (
    dirichlet,
    partition_indices,
    pathological,
    split_train_test,
)


def make_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` samples of each class, in shuffled order."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_disjoint_sorted(parts: list[np.ndarray]) -> np.ndarray:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each part is sorted without duplicates"
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything), "parts overlap"
    return everything


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) for x, y in zip(a, b, strict=False)
    )


# ------------------------------------------------------------------ pathological


@pytest.mark.parametrize(("num_clients", "k"), [(10, 2), (7, 3), (20, 1), (3, 2)])
def test_pathological_every_sample_of_every_held_class_is_assigned(num_clients, k):
    labels = make_labels(10, 120)
    parts = pathological(labels, num_clients, k, seed=42)
    assert len(parts) == num_clients
    everything = assert_disjoint_sorted(parts)
    held = set().union(*(np.unique(labels[p]).tolist() for p in parts))
    assert np.array_equal(
        np.sort(everything), np.flatnonzero(np.isin(labels, sorted(held)))
    )
    for part in parts:
        assert len(np.unique(labels[part])) == k


def test_pathological_draws_classes_like_the_reference_code():
    """Seed 42, 10 clients, 2 of 10 classes: the authors' code's class sets."""
    labels = make_labels(10, 100)
    parts = pathological(labels, 10, 2, seed=42)
    rs = np.random.RandomState(42)
    expected = [set(rs.choice(10, size=2, replace=False).tolist()) for _ in range(10)]
    assert [set(np.unique(labels[p]).tolist()) for p in parts] == expected
    assert expected[0] == {1, 8} and expected[9] == {2, 4}


def test_pathological_shares_follow_weights():
    """A class held by h clients: each share is w_i / sum(w) with w in [0.4, 0.6]."""
    labels = make_labels(10, 1000)
    parts = pathological(labels, 10, 2, seed=3)
    holders = np.bincount(np.concatenate([np.unique(labels[p]) for p in parts]))
    for part in parts:
        for c in np.unique(labels[part]):
            h = holders[c]
            share = np.sum(labels[part] == c) / 1000
            low, high = 0.4 / (0.4 + 0.6 * (h - 1)), 0.6 / (0.6 + 0.4 * (h - 1))
            assert low - 2e-3 <= share <= high + 2e-3


def test_pathological_deterministic_and_seed_dependent():
    labels = make_labels(10, 100)
    a = pathological(labels, 10, 2, seed=42)
    assert same(a, pathological(labels, 10, 2, seed=42))
    assert not same(a, pathological(labels, 10, 2, seed=43))


def test_pathological_handles_non_contiguous_labels():
    labels = np.repeat(np.array([3, 7, 11]), 40)
    parts = pathological(labels, 3, 2, seed=0)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


@pytest.mark.parametrize("k", [0, 11])
def test_pathological_rejects_bad_classes_per_client(k):
    with pytest.raises(ValueError, match="classes_per_client"):
        pathological(make_labels(10, 10), 5, k, seed=0)


# --------------------------------------------------------------------- dirichlet


@pytest.mark.parametrize("alpha, num_clients", [(0.1, 20), (0.5, 10), (100.0, 5)])
def test_dirichlet_disjoint_complete_and_minimum(alpha, num_clients):
    labels = make_labels(10, 300)
    parts = dirichlet(labels, num_clients, alpha, seed=42)
    everything = assert_disjoint_sorted(parts)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 31


def test_dirichlet_small_alpha_is_skewed():
    labels = make_labels(10, 300)
    parts = dirichlet(labels, 10, 0.01, seed=0, min_size=1)
    dominant = [np.bincount(labels[p]).max() / len(p) for p in parts]
    assert np.median(dominant) > 0.9


def test_dirichlet_deterministic_and_seed_dependent():
    labels = make_labels(10, 200)
    a = dirichlet(labels, 10, 0.5, seed=7)
    assert same(a, dirichlet(labels, 10, 0.5, seed=7))
    assert not same(a, dirichlet(labels, 10, 0.5, seed=8))


def test_dirichlet_class_counts_match_flwr_datasets():
    """Same per-client per-class counts as flwr's DirichletPartitioner (no balancing),
    in a case where both redraw several times before every client has 31 samples."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = make_labels(5, 200, seed=4)
    ours = dirichlet(labels, 8, 0.3, seed=11, min_size=31)
    flwr = DirichletPartitioner(
        num_partitions=8,
        partition_by="label",
        alpha=0.3,
        min_partition_size=31,
        self_balancing=False,
        seed=11,
    )
    flwr.dataset = Dataset.from_dict({"label": labels.tolist()})
    with pytest.warns(UserWarning, match="min_partition_size"):  # it did redraw
        flwr.load_partition(0)
    for i, part in enumerate(ours):
        theirs = np.asarray(flwr.load_partition(i)["label"])
        assert np.array_equal(
            np.bincount(labels[part], minlength=5), np.bincount(theirs, minlength=5)
        )


def test_dirichlet_too_many_clients_is_a_clear_error():
    with pytest.raises(ValueError, match="only 100 samples"):
        dirichlet(make_labels(10, 10), 10, 0.5, seed=0)


def test_dirichlet_unreachable_minimum_is_a_clear_error():
    with pytest.raises(ValueError, match="no draw in 5 gave all 30 clients"):
        dirichlet(make_labels(10, 100), 30, 0.001, seed=0, min_size=31, max_attempts=5)


# ----------------------------------------------------------------- split, dispatch


@pytest.mark.parametrize("n, n_train", [(100, 75), (31, 23), (4, 3), (1, 0)])
def test_split_train_test_sizes_and_disjointness(n, n_train):
    indices = np.arange(1000, 1000 + n) * 3
    train, test = split_train_test(indices, seed=5)
    assert (len(train), len(test)) == (n_train, n - n_train)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    assert not set(train.tolist()) & set(test.tolist())


def test_split_train_test_deterministic_and_seed_dependent():
    indices = np.arange(200)
    a = split_train_test(indices, seed=1)
    assert same(list(a), list(split_train_test(indices, seed=1)))
    assert not same(list(a), list(split_train_test(indices, seed=2)))


def test_partition_indices_dispatch_and_unknown_scheme():
    labels = make_labels(10, 100)
    assert same(
        partition_indices(labels, 10, "pathological", 42, 2, 0.1),
        pathological(labels, 10, 2, 42),
    )
    assert same(
        partition_indices(labels, 10, "dirichlet", 42, 2, 0.5),
        dirichlet(labels, 10, 0.5, 42),
    )
    with pytest.raises(ValueError, match="pathological, dirichlet"):
        partition_indices(labels, 10, "iid", 42, 2, 0.1)
