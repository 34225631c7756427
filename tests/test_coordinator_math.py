"""Staleness weights, aggregation rules and strategies against hand-computed values."""

import numpy as np
import pytest

from coordinator.aggregation import capped_weights, coordinate_median, parse_aggregate, trimmed_mean, weighted_mean
from coordinator.staleness import Constant, Hinge, Polynomial, parse_staleness
from coordinator.strategies import FedAsync, FedAvg, FedBuff, make_strategy


def test_staleness_functions():
    assert Constant()(7) == 1.0
    assert Polynomial(0.5)(3) == pytest.approx(0.5)  # (1+3)^-0.5
    assert Polynomial(1.0)(0) == 1.0
    hinge = Hinge(a=10, b=4)
    assert hinge(4) == 1.0
    assert hinge(5) == pytest.approx(1 / 11)  # 1/(10*(5-4)+1)
    assert hinge(6) == pytest.approx(1 / 21)
    assert parse_staleness("hinge:10,4") == hinge
    assert parse_staleness("polynomial:0.5") == Polynomial(0.5)
    assert parse_staleness("constant") == Constant()
    for bad in ("poly:1", "hinge:1", "polynomial:-1", "polynomial:x", "constant:2"):
        with pytest.raises(ValueError):
            parse_staleness(bad)


def test_aggregation_rules():
    d = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, -30.0], [100.0, 40.0]])
    np.testing.assert_allclose(weighted_mean(d[:2], np.array([1.0, 3.0])), [1.75, 17.5])
    np.testing.assert_allclose(coordinate_median(d), [2.5, 15.0])
    np.testing.assert_allclose(trimmed_mean(d, 0.25), [2.5, 15.0])  # drops 1 low + 1 high per coordinate
    np.testing.assert_allclose(trimmed_mean(d, 0.0), d.mean(axis=0))
    with pytest.raises(ValueError):
        parse_aggregate("trimmed-mean:0.5")
    with pytest.raises(ValueError):
        parse_aggregate("mode")


def test_fedasync_mixes_with_the_local_model():
    s = FedAsync(alpha=0.5, staleness=Polynomial(1.0))
    x = np.array([1.0, 2.0])
    base = np.array([0.0, 0.0])
    out = s.add(x, np.array([4.0, -4.0]), n_samples=10, staleness=1, base=base)
    a = 0.5 * 0.5  # alpha * (1 + 1)^-1
    np.testing.assert_allclose(out, (1 - a) * x + a * np.array([4.0, -4.0]))
    np.testing.assert_array_equal(x, [1.0, 2.0])  # not modified in place
    # without a known base it is the delta form
    np.testing.assert_allclose(s.add(x, np.array([4.0, -4.0]), 10, 1), x + a * np.array([4.0, -4.0]))


def test_fedasync_cannot_overshoot_with_many_updates_from_one_base():
    s = FedAsync(alpha=0.6)
    base = np.zeros(1)
    x = base.copy()
    for _ in range(20):
        x = s.add(x, np.array([1.0]), 1, 0, base=base)
    assert 0.99 < x[0] <= 1.0  # converges to the local model, never past it


def test_fedbuff_waits_for_k_then_steps():
    s = FedBuff(buffer_size=3, server_lr=0.5, staleness=Polynomial(1.0))
    x = np.zeros(2)
    assert s.add(x, np.array([2.0, 0.0]), n_samples=1, staleness=0) is None
    assert s.add(x, np.array([0.0, 4.0]), n_samples=2, staleness=1) is None  # weight 1/2
    assert s.pending == 2
    out = s.add(x, np.array([6.0, 6.0]), n_samples=2, staleness=2)  # weight 1/3
    # sum n_i w_i d_i / sum n_i = ([2,0]*1 + [0,2]*2 + [2,2]*2) / 5 = [1.2, 1.6]; times lr 0.5
    np.testing.assert_allclose(out, [0.6, 0.8])
    assert s.pending == 0


def test_fedbuff_median_ignores_an_outlier():
    s = FedBuff(buffer_size=3, aggregate="median")
    x = np.zeros(1)
    s.add(x, np.array([1.0]), 1, 0)
    s.add(x, np.array([1.2]), 1, 0)
    np.testing.assert_allclose(s.add(x, np.array([-1000.0]), 1, 0), [1.0])


def test_fedavg_round_takes_only_fresh_updates():
    s = FedAvg(clients_per_round=2)
    assert s.admit(1) == "stale_round"
    assert s.admit(0) is None
    x = np.zeros(1)
    assert s.add(x, np.array([1.0]), 1, 0) is None
    np.testing.assert_allclose(s.add(x, np.array([3.0]), 3, 0), [2.0])  # its 3 capped at the lower median, 1


def test_no_row_weighs_more_than_the_buffers_lower_median_count():
    """Issue 18 point 3: whatever one agent claims, its row weighs no more than the typical row (seen red at
    2x the median: the liar held 1/3 of a step of 5; of 2 rows, uncapped, all of it)."""
    np.testing.assert_array_equal(capped_weights(np.array([5.0, 1.0, 3.0, 10**9, 3.0]))[0], [3, 1, 3, 3, 3])
    assert capped_weights(np.array([5.0, 1.0, 3.0, 10**9, 3.0]))[1] == 2  # 5 and 10^9 lowered
    assert capped_weights(np.array([2.0, 10**9]))[1] == 1 and capped_weights(np.array([7.0]))[1] == 0
    np.testing.assert_array_equal(capped_weights(np.array([0.0, 4.0]))[0], [0.0, 4.0])  # a zero median caps nothing
    for rows in (2, 5):
        s = FedBuff(buffer_size=rows)
        x = np.zeros(1)
        for i in range(rows - 1):
            s.add(x, np.array([1.0]), 100, 0, agent=f"h{i}")
        out = s.add(x, np.array([-1.5]), 10**9, 0, agent="liar")
        np.testing.assert_allclose(out, [(rows - 1 - 1.5) / rows])  # one row of `rows`, as if it claimed 100
        assert s.bounded_["weight_cap"] == 1


def test_make_strategy():
    assert isinstance(make_strategy("fedbuff", buffer_size=2), FedBuff)
    with pytest.raises(ValueError):
        make_strategy("fedprox")
    with pytest.raises(ValueError):
        FedAsync(alpha=0)


def test_fedasync_with_current_base_is_the_paper_rule():
    # s = 0: x <- (1 - a) x + a x_new with x_new = x + delta, i.e. x + a * delta
    s = FedAsync(alpha=0.5, staleness=Hinge(10, 4))
    x = np.array([1.0, -1.0, 0.5])
    delta = np.array([0.2, 0.4, -1.0])
    np.testing.assert_allclose(s.add(x, delta, 5, 0, base=x), [1.1, -0.8, 0.0])


def test_fedbuff_trimmed_mean_of_staleness_weighted_deltas_with_server_lr():
    s = FedBuff(buffer_size=4, server_lr=2.0, staleness=Hinge(a=1, b=0), aggregate="trimmed-mean:0.25")
    x = np.array([10.0])
    # weights w(s) = 1/(s+1) for s = 0, 1, 3, 0: rows 4, 4, 2, 100 -> drop 2 and 100 -> mean 4
    for delta, staleness in (([4.0], 0), ([8.0], 1), ([8.0], 3)):
        assert s.add(x, np.array(delta), 1, staleness) is None
    np.testing.assert_allclose(s.add(x, np.array([100.0]), 1, 0), [10.0 + 2.0 * 4.0])


def test_parse_staleness_says_what_is_wrong():
    with pytest.raises(ValueError, match="must be numbers"):
        parse_staleness("hinge:a,4")
    with pytest.raises(ValueError, match=">= 0"):
        parse_staleness("polynomial:-0.5")
    with pytest.raises(ValueError, match="use constant, polynomial:A or hinge:A,B"):
        parse_staleness("exponential:2")
    assert str(parse_staleness("hinge:10,4")) == "hinge:10,4"


def test_fedasync_leaves_its_inputs_alone():
    """The in-place mix works on a new array: the caller's model, base and delta are unchanged
    (seen red mixing into `delta` in place)."""
    params, base, delta = np.array([1.0, 2.0]), np.array([0.5, 1.5]), np.array([4.0, -4.0])
    copies = [params.copy(), base.copy(), delta.copy()]
    s = FedAsync(alpha=0.5)
    np.testing.assert_allclose(s.add(params, delta, 1, 0, base), 0.5 * params + 0.5 * (base + delta))
    np.testing.assert_allclose(s.add(params, delta, 1, 0), params + 0.5 * delta)
    for before, after in zip(copies, (params, base, delta)):
        np.testing.assert_array_equal(before, after)


def test_l2_norm_in_chunks_is_the_norm():
    """Chunked below OpenBLAS's threading length, the norm is still the whole vector's (seen red
    dropping the last chunk)."""
    from coordinator.validation import NORM_CHUNK, l2_norm

    rng = np.random.default_rng(0)
    for n in (0, 1, NORM_CHUNK, NORM_CHUNK + 1, 100_000):
        x = rng.normal(size=n)
        assert l2_norm(x) == pytest.approx(float(np.linalg.norm(x)), rel=1e-12)


def test_judged_norm_is_what_the_strategy_applies_never_more_than_the_distance():
    """fedbuff adds the delta: a slow device's typical delta from an old base is judged by its own norm,
    not by its distance from a model that moved on (that refused every update of the slowest devices,
    docs/benchmarks.md section 16); fedasync mixes the agent's model in: the distance alone."""
    from coordinator.validation import judged_norm

    u, w = np.eye(4)[0], np.eye(4)[1]
    base, current = np.zeros(4), 5 * u  # the fleet moved 5 along u since the device's base
    assert judged_norm(w, base, current, mixes_models=False) == pytest.approx(1.0)  # its delta's norm
    assert judged_norm(w, base, current, mixes_models=True) == pytest.approx(np.sqrt(26))  # |w - 5u|
    late = 5 * u + 0.1 * w  # a late model that lands near the current one: its distance, as before
    assert judged_norm(late, base, current, mixes_models=False) == pytest.approx(0.1)
    assert judged_norm(-4 * w, base, current, mixes_models=False) == pytest.approx(4.0)  # a flip keeps its size
    assert judged_norm(w, None, current, mixes_models=True) == pytest.approx(1.0)  # base no longer held
    assert judged_norm(w, current, current, mixes_models=False) == pytest.approx(1.0)  # fresh: both the same
    rng = np.random.default_rng(0)
    for _ in range(200):  # never above today's measure (the distance): no update accepted today is refused
        d, b, c = rng.normal(size=(3, 6)) * rng.uniform(0.1, 10, 3)[:, None]
        assert judged_norm(d, b, c, False) <= judged_norm(d, b, c, True) == pytest.approx(np.linalg.norm(b + d - c))
