"""Issue 12: federated feature statistics, their wire format, scaling, re-expression, gaps."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from coordinator.server import Coordinator
from coordinator.statistics import FleetStatistics
from coordinator.strategies import make_strategy
from coordinator.validation import UpdateValidator
from edge_agent.statistics import LocalStatistics, prepare_features
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ModelSpec, build_estimator
from protocol.statistics import (Scaling, describe, identity, merge, merge_all, reexpress, reexpress_gain, scaling_of,
                                 standardize)
from protocol.stats_message import decode_stats, encode_stats
from protocol.tabular import DataError, parse_rows
from protocol.topics import Topics

TOPICS = Topics("stats-test")


def _raw(rng, n=200, d=5):
    """Features in wildly different units: gains 1e-3..1e3 and offsets."""
    gains = 10.0 ** rng.uniform(-3, 3, d)
    return rng.standard_normal((n, d)) * gains + gains * rng.uniform(-50, 50, d)


def test_merge_of_parts_equals_the_pooled_statistics():
    rng = np.random.default_rng(1)
    X = _raw(rng)
    X[rng.random(X.shape) < 0.1] = np.nan
    parts = [describe(X[a:b]) for a, b in ((0, 7), (7, 90), (90, 91), (91, 200))]
    merged, pooled = merge_all(parts), describe(X)
    np.testing.assert_array_equal(merged.count, pooled.count)
    np.testing.assert_allclose(merged.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, pooled.m2, rtol=1e-9)
    np.testing.assert_array_equal(merged.min, pooled.min)
    np.testing.assert_array_equal(merged.max, pooled.max)
    s = scaling_of(merged)
    np.testing.assert_allclose(s.mean, np.nanmean(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.scale, np.nanstd(X, axis=0), rtol=1e-9)


def test_the_wire_carries_count_sum_and_sum_of_squares_and_merges_exactly():
    rng = np.random.default_rng(2)
    X = _raw(rng, 100, 4)
    a, b = decode_stats(encode_stats(describe(X[:40])), 4), decode_stats(encode_stats(describe(X[40:])), 4)
    wire = msgpack.unpackb(encode_stats(describe(X[:40])))
    assert set(wire) == {"format", "type", "count", "sum", "sumsq", "min", "max"}
    np.testing.assert_allclose(np.frombuffer(wire["sum"], "<f8"), X[:40].sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.frombuffer(wire["sumsq"], "<f8"), (X[:40] ** 2).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaling_of(merge(a, b)).scale, X.std(axis=0), rtol=1e-7)


@pytest.mark.parametrize("mutate, reason", [
    (lambda w: w.update(count=np.array([1.0, -1.0]).astype("<f8").tobytes()), "schema"),
    (lambda w: w.update(sum=np.array([np.inf, 1.0]).astype("<f8").tobytes()), "non_finite"),
    (lambda w: w.update(min=np.array([9.0, 9.0]).astype("<f8").tobytes()), "schema"),
    (lambda w: w.update(max=b"\x00" * 8), "shape"),
    (lambda w: w.update(type="update"), "schema"),
    (lambda w: w.pop("sumsq"), "schema"),
])
def test_hostile_statistics_are_refused_with_a_reason(mutate, reason):
    wire = msgpack.unpackb(encode_stats(describe(np.array([[1.0, 2.0], [3.0, 5.0]]))))
    mutate(wire)
    with pytest.raises(ProtocolError) as err:
        decode_stats(msgpack.packb(wire, use_bin_type=True), 2)
    assert err.value.reason == reason
    with pytest.raises(ProtocolError):
        decode_stats(encode_stats(describe(np.ones((3, 3)))), 2)  # wrong feature count


@pytest.mark.parametrize("classes", [(0, 1), (0, 1, 2), ()])
def test_reexpression_computes_the_same_function_of_the_raw_features(classes):
    rng = np.random.default_rng(3)
    X = _raw(rng, 50, 4)
    spec = ModelSpec("sgd-classifier" if classes else "sgd-regressor", 4, classes)
    params = rng.standard_normal(spec.n_params)
    old = scaling_of(describe(X[:10]))
    new = scaling_of(describe(X))
    before = build_estimator(spec, params).decision_function(standardize(X, old)) if classes \
        else build_estimator(spec, params).predict(standardize(X, old))
    moved = reexpress(params, spec.coef_shape, old, new)
    after = build_estimator(spec, moved).decision_function(standardize(X, new)) if classes \
        else build_estimator(spec, moved).predict(standardize(X, new))
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9 * np.abs(before).max())
    # linear in the parameters: a delta re-expresses like the params it is added to
    delta = rng.standard_normal(spec.n_params)
    np.testing.assert_allclose(reexpress(params + delta, spec.coef_shape, old, new),
                               moved + reexpress(delta, spec.coef_shape, old, new), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(reexpress(params, spec.coef_shape, identity(4), identity(4)), params)


@pytest.mark.parametrize("spec", [ModelSpec("sgd-classifier", 4, (0, 1, 2)), ModelSpec("sgd-classifier", 4, (0, 1)),
                                  ModelSpec("sgd-regressor", 4, ()), ModelSpec("sgd-one-class-svm", 4, ())])
def test_reexpress_gain_bounds_how_much_a_re_expression_lengthens_a_vector(spec):
    """The norm bound converts its reference with it: below the true lengthening an honest update would be
    refused for the units alone."""
    rng = np.random.default_rng(5)
    shift = 1.0 if spec.is_one_class else 0.0
    for _ in range(20):
        X = _raw(rng, 40, 4)
        old, new = scaling_of(describe(X[:8])), scaling_of(describe(X))
        gain = reexpress_gain(old, new, shift)
        for v in (rng.standard_normal(spec.n_params), np.eye(spec.n_params)[rng.integers(spec.n_params)]):
            assert np.linalg.norm(reexpress(v, spec.coef_shape, old, new, shift)) <= gain * np.linalg.norm(v) * (1 + 1e-12)
    assert reexpress_gain(identity(4), identity(4)) == pytest.approx(2.0)  # 1 + sqrt(1): the bound's slack


def test_the_model_message_carries_the_scaling_exactly():
    spec = ModelSpec("sgd-classifier", 3, (0, 1))
    scaling = Scaling(np.array([1000.123456789, -2.5, 1e-7]), np.array([317.25, 1e-3, 2.0]))
    msg = decode_model(encode_model(ModelMessage("f", 1, spec, np.zeros(spec.n_params), scaling=scaling)))
    assert msg.scaling == scaling
    assert decode_model(encode_model(ModelMessage("f", 1, spec, np.zeros(spec.n_params)))).scaling is None
    wire = msgpack.unpackb(encode_model(ModelMessage("f", 1, spec, np.zeros(spec.n_params), scaling=scaling)))
    wire["scaling"]["scale"] = np.array([1.0, 0.0, 1.0]).astype("<f8").tobytes()
    with pytest.raises(ProtocolError):
        decode_model(msgpack.packb(wire, use_bin_type=True))


def test_gaps_are_missing_values_and_text_stays_an_error():
    X, y = parse_rows(["a", "b", "label"], [["1", "", "0"], ["NaN", "4", "1"], ["5", "6", "1"]], "label", "t.csv")
    assert np.isnan(X[0, 1]) and np.isnan(X[1, 0]) and list(y) == [0, 1, 1]
    with pytest.raises(DataError, match="'oops' is not a number"):
        parse_rows(["a", "label"], [["oops", "1"]], "label", "t.csv")
    with pytest.raises(DataError, match="label is missing"):
        parse_rows(["a", "label"], [["1", ""]], "label", "t.csv")
    with pytest.raises(DataError, match="not finite"):
        parse_rows(["a", "label"], [["inf", "1"]], "label", "t.csv")
    scaling = Scaling(np.array([10.0, 20.0]), np.array([2.0, 4.0]))
    Z, missing = prepare_features(np.array([[np.nan, 24.0], [12.0, np.nan]]), scaling)
    assert missing == 2
    np.testing.assert_array_equal(Z, [[0.0, 1.0], [1.0, 0.0]])  # the fleet mean standardizes to 0


def test_local_statistics_are_resent_when_the_window_grew():
    local = LocalStatistics(resend_growth=0.5)
    X = np.arange(20.0).reshape(10, 2)
    assert local.payload_if_due(X) is not None
    assert local.payload_if_due(X[:12 - 2]) is None
    assert local.payload_if_due(np.vstack([X, X])) is not None


def _core(**options):
    spec = ModelSpec("sgd-classifier", 3, (0, 1))
    strategy = make_strategy("fedasync", alpha=0.5)
    return Coordinator(TOPICS, spec, strategy, UpdateValidator(TOPICS, spec.n_params), publish_interval=0,
                       statistics=FleetStatistics(TOPICS, 3, **options))


def test_the_first_model_waits_for_statistics_and_a_late_joiner_refines_them_exactly():
    rng = np.random.default_rng(4)
    X = _raw(rng, 90, 3)
    core = _core(min_agents=2)
    assert not core.ready
    assert core.handle_statistics(TOPICS.stats("a"), encode_stats(describe(X[:30]))) is None
    assert not core.ready
    assert core.handle_statistics(TOPICS.stats("b"), encode_stats(describe(X[30:60]))) is None
    assert core.ready and core.publish_due()
    first = decode_model(core.model_payload())
    np.testing.assert_allclose(first.scaling.mean, X[:60].mean(axis=0), rtol=1e-12)
    core.params_ = rng.standard_normal(core.spec.n_params)  # as if trained
    trained = build_estimator(core.spec, core.params_).decision_function(standardize(X, first.scaling))
    version = core.version_
    for agent in "abc":  # norms in the first scaling's units
        core.validator.norm.observed(1.0, agent)
    assert core.handle_statistics(TOPICS.stats("c"), encode_stats(describe(X[60:]))) is None  # joins late
    assert core.handle_statistics("stats-test/stats/+", b"x") == "topic"
    assert core.publish_due()
    refined = decode_model(core.model_payload())
    assert refined.version == version + 1  # agents must see it as newer
    np.testing.assert_allclose(refined.scaling.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(refined.scaling.scale, X.std(axis=0), rtol=1e-9)
    again = build_estimator(core.spec, core.params_).decision_function(standardize(X, refined.scaling))
    np.testing.assert_allclose(again, trained, rtol=1e-9, atol=1e-9)
    assert core.status()["statistics"]["agents"] == 3
    # the norm reference is converted to the new units (an upper bound), not dropped: it keeps judging
    gain = reexpress_gain(first.scaling, refined.scaling)
    assert dict(core.validator.norm.recent[0]) == pytest.approx({agent: gain for agent in "abc"})
    # a delta trained on the older scaling is re-expressed before it is applied
    np.testing.assert_allclose(core.rescales.catch_up(np.ones(4), version),
                               reexpress(np.ones(4), core.spec.coef_shape, first.scaling, refined.scaling))
    np.testing.assert_array_equal(core.rescales.catch_up(np.ones(4), refined.version), np.ones(4))


def test_statistics_and_scaling_survive_a_restart():
    rng = np.random.default_rng(5)
    X = _raw(rng, 40, 3)
    core = _core()
    core.handle_statistics(TOPICS.stats("a"), encode_stats(describe(X)))
    published = decode_model(core.model_payload())
    state = core.state()
    spec = core.spec
    resumed = Coordinator(TOPICS, spec, make_strategy("fedasync", alpha=0.5), UpdateValidator(TOPICS, spec.n_params),
                          statistics=FleetStatistics(TOPICS, 3), resume=state)
    assert resumed.rescales.current == published.scaling
    assert resumed.statistics.by_agent["a"] == core.statistics.by_agent["a"]
    assert not resumed.publish_due(ignore_version=False) or resumed.version_ != resumed.published_version_


def test_an_update_trained_before_a_refinement_is_re_expressed_before_it_is_applied():
    from edge_agent.agent import Agent
    from edge_agent.data import ArraySource
    from edge_agent.trainer import LocalTrainer

    rng = np.random.default_rng(6)
    X = _raw(rng, 120, 3)
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)
    cores = [_core(), _core()]
    for core in cores:
        core.handle_statistics(TOPICS.stats("a"), encode_stats(describe(X[:60])))
        model = core.model_payload()
    agent = Agent("a", TOPICS, ArraySource(X[:60], y[:60]), LocalTrainer(random_state=0), "float32", seed=0)
    agent.on_model(model)
    agent.due()
    update = agent.make_update()
    old = cores[0].rescales.current
    refined = cores[0]
    refined.handle_statistics(TOPICS.stats("b"), encode_stats(describe(X[60:])))  # joins while a trains
    refined.model_payload()
    new = refined.rescales.current
    for core in cores:
        assert core.handle_update(TOPICS.update("a"), update) is None
    expected = reexpress(cores[1].params_, refined.spec.coef_shape, old, new)  # as if applied, then refined
    np.testing.assert_allclose(refined.params_, expected, rtol=1e-6, atol=1e-6)


def test_the_coordinator_eval_csv_with_gaps_needs_the_fleet_statistics(tmp_path):
    from coordinator.cli import build_coordinator, parse_args

    path = tmp_path / "eval.csv"
    path.write_text("a,b,label\n1000,,0\n2000,3,1\n")
    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "x", "--model", "sgd-classifier", "--classes", "0,1",
            "--n-features", "2", "--eval-csv", str(path)]
    with pytest.raises(DataError, match="1 missing value.*--feature-stats"):
        build_coordinator(parse_args(base + ["--no-feature-stats"]))  # the statistics are on by default
    core = build_coordinator(parse_args(base + ["--stats-min-agents", "2"]))
    assert core.statistics.min_agents == 2 and not core.ready
    core.handle_statistics("fedmq/x/stats/a", encode_stats(describe(np.ones((3, 2)))))
    core.handle_statistics("fedmq/x/stats/b", encode_stats(describe(np.array([[1000.0, 3.0], [2000.0, 5.0]]))))
    core.model_payload()
    assert "accuracy" in core.scores_  # scored on the standardized, imputed eval set


def test_an_agent_with_no_feature_stats_sends_none_and_by_default_sends_them():
    """fedmq-agent --no-feature-stats: nothing about its data leaves the device on stats/<id> (docs/security.md)."""
    from edge_agent.agent import Agent
    from edge_agent.cli import parse_args
    from edge_agent.data import ArraySource
    from edge_agent.trainer import LocalTrainer

    X = _raw(np.random.default_rng(7), 40, 3)
    y = (X[:, 0] > 0).astype(int)
    made = {}
    for name, argv in (("default", []), ("off", ["--no-feature-stats"])):
        args = parse_args(["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", "x.csv", *argv])
        made[name] = Agent("a", TOPICS, ArraySource(X, y), LocalTrainer(), "float32", share_statistics=args.feature_stats)
    assert decode_stats(made["default"].statistics_payload()).count.max() == 40
    assert made["off"].statistics_payload() is None
