"""Partitioners: complete, disjoint, seeded, and as skewed as their scheme says."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from simulation.partition import parse_scheme, partition

DIGITS_Y = load_digits().target  # 1797 rows, 10 classes
REGRESSION_Y = np.random.default_rng(1).normal(size=1000)
SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:1", "shards:2"]


def mean_label_entropy(y, parts):
    """Mean over parts of the entropy (nats) of each part's label histogram."""
    entropies = []
    for p in parts:
        counts = np.unique(y[p], return_counts=True)[1]
        q = counts / counts.sum()
        entropies.append(-(q * np.log(q)).sum())
    return float(np.mean(entropies))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("y", [DIGITS_Y, REGRESSION_Y], ids=["labels", "regression"])
@pytest.mark.parametrize("n_parts", [1, 7, 50])
def test_parts_are_disjoint_and_cover_every_row(y, scheme, n_parts):
    parts = partition(y, n_parts, scheme, seed=3)
    assert len(parts) == n_parts
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(y)))  # each row exactly once
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_parts_other_seed_other_parts(scheme):
    first = partition(DIGITS_Y, 10, scheme, seed=7)
    again = partition(DIGITS_Y, 10, scheme, seed=7)
    other = partition(DIGITS_Y, 10, scheme, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one_and_keep_every_label():
    parts = partition(DIGITS_Y, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_label_entropy(DIGITS_Y, parts) > 0.95 * np.log(10)


def test_smaller_dirichlet_alpha_means_more_label_skew():
    entropy = {
        a: mean_label_entropy(DIGITS_Y, partition(DIGITS_Y, 20, f"dirichlet:{a}", seed=0)) for a in (0.05, 0.5, 100)
    }
    assert entropy[0.05] < entropy[0.5] < entropy[100]
    assert entropy[0.05] < 0.4 * np.log(10)
    assert entropy[100] > 0.95 * np.log(10)


def test_dirichlet_skews_a_regression_target_by_its_deciles():
    def spread_of_part_means(scheme):
        return np.std([REGRESSION_Y[p].mean() for p in partition(REGRESSION_Y, 10, scheme, seed=0)])

    assert spread_of_part_means("dirichlet:0.1") > 3 * spread_of_part_means("iid")


def test_every_part_gets_min_size_even_under_extreme_skew():
    y = np.repeat(np.arange(10), 10)  # 100 rows, 40 parts: Dirichlet(0.01) leaves most parts empty
    for seed in range(5):
        parts = partition(y, 40, "dirichlet:0.01", seed=seed, min_size=2)
        assert min(len(p) for p in parts) >= 2
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(100))


def test_shards_give_each_part_at_most_k_labels_when_classes_fill_whole_shards():
    y = np.repeat(np.arange(10), 20)  # 20 shards of 10 rows, two per class
    for k in (1, 2):
        parts = partition(y, 20 // k, f"shards:{k}", seed=0)
        assert max(len(np.unique(y[p])) for p in parts) <= k


def test_shards_on_digits_stay_far_from_iid():
    parts = partition(DIGITS_Y, 10, "shards:2", seed=0)
    labels_per_part = [len(np.unique(DIGITS_Y[p])) for p in parts]
    assert max(labels_per_part) <= 4  # a shard may straddle one class boundary
    assert mean_label_entropy(DIGITS_Y, parts) < 0.5 * mean_label_entropy(DIGITS_Y, partition(DIGITS_Y, 10, "iid"))


def test_parse_scheme():
    assert parse_scheme("iid") == ("iid", None)
    assert parse_scheme(" dirichlet:0.5 ") == ("dirichlet", 0.5)
    assert parse_scheme("shards:3") == ("shards", 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "unknown partition scheme"),
        ("noniid", "unknown partition scheme"),
        ("iid:3", "unknown partition scheme"),
        ("dirichlet", "needs a number"),
        ("dirichlet:abc", "needs a number"),
        ("dirichlet:0", "ALPHA must be"),
        ("dirichlet:-1", "ALPHA must be"),
        ("dirichlet:nan", "ALPHA must be"),
        ("dirichlet:inf", "ALPHA must be"),
        ("shards:0", "K must be"),
        ("shards:1.5", "K must be"),
        ("shards:inf", "K must be"),
    ],
)
def test_bad_schemes_are_refused_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(text)
    with pytest.raises(ValueError, match=message):
        partition(DIGITS_Y, 5, text)


@pytest.mark.parametrize(
    "n_parts, scheme, kwargs, message",
    [
        (0, "iid", {}, "integer >= 1"),
        (2.5, "iid", {}, "integer >= 1"),
        (11, "iid", {}, "cannot give 11 parts"),  # 20 rows, 2 each at least
        (10, "iid", {"min_size": 3}, "cannot give 10 parts"),
        (5, "shards:5", {"min_size": 1}, "needs 25 rows"),
    ],
)
def test_more_parts_than_rows_is_refused(n_parts, scheme, kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(np.repeat([0, 1], 10), n_parts, scheme, **kwargs)


def test_two_dimensional_target_is_refused():
    with pytest.raises(ValueError, match="1-D"):
        partition(np.zeros((10, 2)), 2, "iid")


def test_string_labels_work():
    y = np.array(["cat", "dog", "bird"] * 10)
    parts = partition(y, 3, "shards:1", seed=0)
    assert [len(np.unique(y[p])) for p in parts] == [1, 1, 1]
