"""protocol/schema.py and coordinator/schema.py: the spec from the first agents, mapping by name, mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.schema import FleetSchema, SchemaDiscovery, majority, refused_labels
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ModelSpec
from protocol.schema import (Schema, column_order, decode_schema, encode_schema, fix_spec, mismatch, of_data,
                             unknown_labels)
from protocol.statistics import describe
from protocol.stats_message import decode_stats, encode_stats
from protocol.topics import Topics

TOPICS = Topics("f")
ABC = Schema(("a", "b", "c"), (0, 1))


def test_schema_round_trips_and_garbage_is_a_protocol_error():
    for schema in (ABC, Schema(("x",), None)):
        assert decode_schema(encode_schema(schema)) == schema
    for bad in (b"", b"\x01", encode_schema(ABC).replace(b"schema", b"stats!")):
        with pytest.raises(ProtocolError):
            decode_schema(bad)
    with pytest.raises(ValueError, match="duplicate"):
        Schema(("a", "a"))


def test_of_data_announces_integer_labels_and_no_labels_for_targets():
    assert of_data(("a",), np.array([2, 0, 2])).labels == (0, 2)
    assert of_data(("a",), np.array([0.5, 1.5])).labels is None


def test_fix_spec_takes_the_commonest_column_set_in_the_first_order_and_the_union_of_labels():
    odd = Schema(("a", "x", "c"), (0, 5))
    spec = fix_spec([odd, Schema(("c", "a", "b"), (1, 2)), ABC], "sgd-classifier", {"alpha": 1e-3})
    assert spec.columns == ("c", "a", "b") and spec.classes == (0, 1, 2) and spec.hyperparameters == {"alpha": 1e-3}
    assert mismatch(odd, spec) == "columns do not match the fleet's: missing column(s) 'b'; unknown column(s) 'x'"
    assert mismatch(Schema(("b", "c", "a"), (1, 9)), spec) is None  # columns match: it trains on labels 0-2
    assert unknown_labels(Schema(("b", "c", "a"), (1, 9)), spec) == [9]


def test_explicit_flags_win_over_the_fleet():
    spec = fix_spec([ABC, Schema(("a", "b"), (0, 1))], "sgd-classifier", n_features=2, classes=(0, 1, 7))
    assert spec.columns == ("a", "b") and spec.classes == (0, 1, 7)
    with pytest.raises(ValueError, match="no agent announced 4"):
        fix_spec([ABC], "sgd-classifier", n_features=4)
    with pytest.raises(ValueError, match="only the label"):
        fix_spec([Schema(("a",), (1,))], "sgd-classifier")
    assert fix_spec([Schema(("a",), None)], "sgd-regressor").classes == ()


def test_column_order_maps_by_name_and_refuses_other_columns():
    spec = ModelSpec("sgd-regressor", 3, columns=("a", "b", "c"))
    X = np.array([[3.0, 1.0, 2.0]])  # columns c, a, b
    assert column_order(("a", "b", "c"), spec) is None
    assert X[:, column_order(("c", "a", "b"), spec)].tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="missing column"):
        column_order(("a", "b", "d"), spec)
    with pytest.raises(ValueError, match="2 feature columns"):
        column_order(("a", "b"), ModelSpec("sgd-regressor", 3))


def test_the_spec_carries_its_columns_in_the_model_message():
    spec = ModelSpec("sgd-classifier", 2, (0, 1), columns=("t", "h"))
    assert decode_model(encode_model(ModelMessage("f", 1, spec, np.zeros(spec.n_params)))).spec == spec
    with pytest.raises(ValueError, match="columns must be 2"):
        ModelSpec("sgd-classifier", 2, (0, 1), columns=("t",))


def test_named_statistics_are_put_in_the_fleet_order():
    X = np.random.default_rng(0).normal(size=(20, 3)) * [1, 10, 100]
    mine = describe(X[:, [2, 0, 1]])
    got = decode_stats(encode_stats(mine, ("c", "a", "b")), 3, ("a", "b", "c"))
    np.testing.assert_allclose(got.mean, X.mean(axis=0))
    with pytest.raises(ProtocolError, match="columns"):
        decode_stats(encode_stats(mine, ("c", "a", "x")), 3, ("a", "b", "c"))


def test_discovery_waits_for_agents_or_the_wait_after_the_first():
    d = SchemaDiscovery(agents=2, wait=5.0)
    assert not d.done(now=0.0)
    d.add(TOPICS, TOPICS.schema("a1"), encode_schema(ABC), now=10.0)
    d.add(TOPICS, TOPICS.schema("a2"), b"garbage", now=11.0)
    assert not d.done(now=14.9) and d.done(now=15.0) and d.rejected_ == 1
    d.add(TOPICS, TOPICS.schema("a3"), encode_schema(Schema(("c", "b", "a"), (2,))), now=12.0)
    assert d.done(now=12.0) and d.spec("sgd-classifier", {}).columns == ("a", "b", "c")


def test_fleet_schema_counts_mismatched_agents_with_the_reason_and_survives_a_checkpoint():
    spec = fix_spec([ABC], "sgd-classifier")
    fleet = FleetSchema(TOPICS, spec)
    assert fleet.handle(TOPICS.schema("ok"), encode_schema(Schema(("c", "a", "b"), (1,)))) is None
    assert fleet.handle(TOPICS.schema("bad"), encode_schema(Schema(("a", "b"), (1,)))) is None
    assert fleet.handle(TOPICS.schema("junk"), b"\xc1") == "decode"
    assert fleet.handle(TOPICS.schema("more"), encode_schema(Schema(("a", "b", "c"), (0, 4)))) is None
    summary = fleet.summary()
    assert (summary["agents"], summary["mismatched"], summary["unknown_labels"]) == (2, 1, {"more": [4]})
    assert summary["reasons"] == {"bad": "columns do not match the fleet's: missing column(s) 'c'"}
    again = FleetSchema(TOPICS, spec)
    again.restore(fleet.state())
    assert again.summary() == summary | {"rejected": {}}
    assert fleet.handle(TOPICS.schema("bad"), b"") is None and fleet.summary()["mismatched"] == 0


def test_unlabeled_rows_are_all_features_and_a_short_row_is_named():
    from protocol.tabular import DataError, parse_rows

    X, y = parse_rows(["a", "b"], [["1", ""], ["3", "4"]], None, "s.csv")
    assert np.array_equal(X, [[1.0, np.nan], [3.0, 4.0]], equal_nan=True) and y.tolist() == [0, 0]
    with pytest.raises(DataError, match="line 3 has 1 cells, header has 2"):
        parse_rows(["a", "b"], [["1", "2"], ["3"]], None, "s.csv")


def test_a_one_class_model_round_trips_its_offset_and_reexpresses_exactly():
    from protocol.model_spec import build_estimator, decision, get_flat_params
    from protocol.statistics import Scaling, reexpress

    spec = ModelSpec("sgd-one-class-svm", 3, hyperparameters={"nu": 0.1})
    params = np.array([0.5, -1.0, 2.0, 0.25])
    est = build_estimator(spec, params)
    assert est.offset_.tolist() == [-0.25] and np.array_equal(get_flat_params(est, spec), params)
    X = np.random.default_rng(0).normal(size=(5, 3)) * 10 + 50
    old, new = Scaling(np.full(3, 40.0), np.full(3, 5.0)), Scaling(np.array([50.0, 45, 55]), np.array([10.0, 8, 12]))
    moved = reexpress(params, spec.coef_shape, old, new, shift=3.0)
    np.testing.assert_allclose(decision(spec, moved, (X - new.mean) / new.scale),
                               decision(spec, params, (X - old.mean) / old.scale), rtol=1e-12)
    # the same decision scikit-learn computes, on the shifted features it is fed
    np.testing.assert_allclose(decision(spec, params, X), est.decision_function(X + 3.0))


def test_the_coordinator_reexpresses_a_one_class_model_with_its_shift():
    from coordinator.statistics import Rescales
    from protocol.model_spec import decision
    from protocol.statistics import Scaling

    spec = ModelSpec("sgd-one-class-svm", 2)
    rescales = Rescales(spec)
    first, refined = Scaling(np.array([1.0, 2.0]), np.array([2.0, 4.0])), Scaling(np.array([3.0, 0.0]), np.array([1.0, 5.0]))
    params = rescales.change(1, first, [np.array([0.7, -0.2, 0.1])])[0]
    moved = rescales.change(2, refined, [params])[0]
    X = np.array([[5.0, -1.0], [0.0, 9.0]])
    np.testing.assert_allclose(decision(spec, moved, (X - refined.mean) / refined.scale),
                               decision(spec, params, (X - first.mean) / first.scale), rtol=1e-12)


def test_a_restart_with_a_checkpoint_takes_the_fixed_spec_without_asking_the_fleet(tmp_path):
    import threading

    from coordinator.cli import build_coordinator, parse_args, resolve_spec
    from protocol.transport import BrokerError

    argv = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier", "--connect-timeout", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    args = parse_args(argv)
    assert args.spec is None  # no --n-features: the fleet says
    with pytest.raises(BrokerError):  # it would ask the fleet (and there is no broker on port 1)
        resolve_spec(args, threading.Event())
    args.spec = fix_spec([Schema(("t", "p"), (0, 1))], "sgd-classifier")  # as the first agents fixed it
    build_coordinator(args)  # its first checkpoint holds the spec
    again = parse_args(argv)
    assert resolve_spec(again, threading.Event()) and again.spec == args.spec  # no connection made
    explicit = parse_args(argv + ["--n-features", "3", "--classes", "0,1"])
    assert resolve_spec(explicit, threading.Event()) and explicit.spec.n_features == 3 and not explicit.spec.columns


def test_prometheus_shows_the_one_class_scores_and_the_mismatched_agents():
    from coordinator.metrics import StatusCollector

    collector = StatusCollector()
    collector.update({"fleet": "f", "version": 3, "accepted": 1, "clipped": 0, "rejected": {}, "pending": 0,
                      "staleness": {"mean": 0.0, "max": 0}, "agents": 2, "uptime_s": 1.0, "fleet_eval": {"flagged": 0.2},
                      "accuracy": None, "r2": None, "roc_auc": 0.91, "flagged": 0.21,
                      "schema": {"mismatched": 1}})
    samples = {(s.name, s.labels.get("metric")): s.value for family in collector.collect() for s in family.samples}
    assert samples[("fedmq_eval_score", "roc_auc")] == 0.91 and samples[("fedmq_eval_score", "flagged")] == 0.21
    assert samples[("fedmq_schema_mismatched", None)] == 1 and samples[("fedmq_fleet_eval", "flagged")] == 0.2


def test_the_fleets_columns_need_a_majority_and_a_quorum():
    xy, abc = Schema(("x", "y"), (0, 1)), Schema(("a", "b", "c"), (0, 1))
    assert majority({"evil": xy, "h0": abc}) is None  # one against one: no majority
    assert majority({"evil": xy, "h0": abc, "h1": abc}) == frozenset("abc")
    assert majority({"evil": xy, "h0": abc, "h1": abc}, quorum=3) is None
    assert majority({"h0": abc, "h1": abc}, among=5) is None  # 2 of the 5 agents known


def test_an_inflated_label_set_is_refused_with_a_reason_and_left_out_of_the_classes():
    honest = {f"h{i}": Schema(("a", "b", "c"), (i, i + 1)) for i in range(3)}  # non-IID: few labels each
    assert refused_labels(honest) == {}
    fleet = dict(honest, evil=Schema(("a", "b", "c"), tuple(range(1000))))
    assert "labels refused: 996 label(s)" in refused_labels(fleet)["evil"]
    d = SchemaDiscovery()
    for agent, schema in fleet.items():
        d.add(TOPICS, TOPICS.schema(agent), encode_schema(schema), now=0.0)
    assert d.spec("sgd-classifier", {}).classes == (0, 1, 2, 3)


def test_one_agent_announcing_first_is_out_voted_and_the_spec_lost():
    """Seen red with the first announcement deciding the spec for good."""
    xy, abc = Schema(("x", "y"), (0, 1)), Schema(("a", "b", "c"), (0, 1))
    d = SchemaDiscovery()
    d.add(TOPICS, TOPICS.schema("evil"), encode_schema(xy), now=0.0)
    assert not d.done(now=0.1) and d.done(now=0.6)  # a grace for the other retained announcements
    fleet = FleetSchema(TOPICS, d.spec("sgd-classifier", {}), discovered=True, known=d.usable())
    fleet.handle(TOPICS.schema("h0"), encode_schema(abc))
    assert not fleet.lost_  # one against one
    fleet.handle(TOPICS.schema("h1"), encode_schema(abc))
    assert fleet.lost_ and "missing column(s) 'x', 'y'" in fleet.summary()["reasons"]["h1"]
    pinned = FleetSchema(TOPICS, fix_spec([xy], "sgd-classifier"))  # the operator's flags: never lost
    for agent in ("h0", "h1", "h2"):
        pinned.handle(TOPICS.schema(agent), encode_schema(abc))
    assert not pinned.lost_
    restarted = FleetSchema(TOPICS, fix_spec([abc], "sgd-classifier"), discovered=True)
    restarted.restore({"agents": {"evil": "no", "h0": None, "h1": None, "h2": None}})
    restarted.handle(TOPICS.schema("evil"), encode_schema(xy))  # the first retained one after a restart
    assert not restarted.lost_  # 1 of the 4 agents the checkpoint knows


def test_an_agent_inflating_the_classes_is_named_and_counted():
    fleet = FleetSchema(TOPICS, fix_spec([ABC], "sgd-classifier"))
    fleet.handle(TOPICS.schema("evil"), encode_schema(Schema(ABC.columns, tuple(range(100)))))
    summary = fleet.summary()
    assert "labels refused: 98 label(s)" in summary["reasons"]["evil"] and summary["rejected"] == {"labels": 1}


def test_a_label_that_is_a_list_or_map_is_a_protocol_error():
    """Red team: labels [[1]] raised TypeError (unhashable) past decode_schema's ValueError
    handler, out of the schema discovery's paho on_message (its network thread ended, the
    coordinator waited for a schema forever). Seen red."""
    import msgpack

    from protocol.messages import FORMAT_VERSION

    for labels in ([[1]], [{"a": 1}], [1, [2]]):
        payload = msgpack.packb({"format": FORMAT_VERSION, "type": "schema", "columns": ["a"], "labels": labels},
                                use_bin_type=True)
        with pytest.raises(ProtocolError, match="labels must be integers"):
            decode_schema(payload)


def test_the_agent_announces_its_schema_again_only_when_polled_rows_change_it(tmp_path):
    """The session asks at every wake; the label set is computed only after a poll brought rows."""
    from edge_agent.agent import Agent
    from edge_agent.data import CSVFile
    from edge_agent.trainer import LocalTrainer

    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n")
    agent = Agent("a0", Topics("f"), CSVFile(path), LocalTrainer(), share_statistics=False)
    agent._poll()
    assert decode_schema(agent.schema_payload()).labels == (0, 1)
    assert agent.schema_payload() is None
    with path.open("a") as fh:
        fh.write("5,6,2\n")
    assert agent.schema_payload() is None  # not polled yet: the window is the same
    agent._poll()
    assert decode_schema(agent.schema_payload()).labels == (0, 1, 2)
    agent.schema_sent_ = None  # a reconnection: said again without new rows
    assert decode_schema(agent.schema_payload()).labels == (0, 1, 2)
