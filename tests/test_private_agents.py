"""Issue 19 point 2: a private agent (local DP, secure aggregation, --private) publishes nothing exact
about its data. The attack: a monitor reader's capture of everything the agents publish (real agent
processes, real mosquitto) must not give any agent's row count, feature means or label set.
"""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fleet import TopicWatcher, spawn, stop
from protocol.schema import decode_schema
from protocol.stats_message import decode_stats
from protocol.tabular import write_csv
from protocol.topics import Topics

pytest.importorskip("dp_accounting")
pytest.importorskip("cryptography")
X, Y = load_digits(return_X_y=True)
TOPICS = Topics("leak")
MODES = {  # agent id -> extra flags
    "plain": (),  # the control: what an attack reads when nothing is private
    "secagg": ("--secure-aggregation",),
    "ldp": ("--dp-clip", "1", "--dp-noise", "1"),
    "ldpstats": ("--dp-clip", "1", "--dp-noise", "1", "--stats-noise", "1", "--stats-clip", "16"),
    "private": ("--private",),
}


def test_a_monitor_capture_recovers_no_row_count_mean_or_label_of_a_private_agent(tmp_path, mosquitto):
    rows, data, label_sets = {}, {}, {}
    for i, agent in enumerate(MODES):
        n = 90 + 17 * i  # distinct row counts
        keep = Y[:n] < 6 + i % 3  # and distinct label sets
        rows[agent] = int(keep.sum())
        data[agent] = X[:n][keep]
        label_sets[agent] = tuple(sorted(set(Y[:n][keep].tolist())))
        write_csv(tmp_path / f"{agent}.csv", X[:n][keep], Y[:n][keep])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)  # the monitor reader's view
    procs = []
    try:
        for agent, extra in MODES.items():
            state = ("--state-file", tmp_path / f"{agent}.state", "--reset-privacy-state") if "--dp-noise" in extra else ()
            procs.append(spawn("edge_agent", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--id", agent,
                               "--data", tmp_path / f"{agent}.csv", "--poll-interval", "0.2", *extra, *state,
                               log=tmp_path / f"{agent}.log"))
        # the schema goes out right after the statistics (if any): once every schema is in, all was said
        watcher.wait_for(lambda: all(TOPICS.schema(a) in watcher.latest and TOPICS.agent_status(a) in watcher.latest
                                     for a in MODES) and TOPICS.stats("ldpstats") in watcher.latest,
                         60, "every agent's schema, status and the noised statistics")
    finally:
        for proc in procs:
            stop(proc)
        watcher.close()
    for agent in MODES:
        status = watcher.json(TOPICS.agent_status(agent))
        labels = decode_schema(watcher.latest[TOPICS.schema(agent)]).labels
        stats = watcher.latest.get(TOPICS.stats(agent))
        if agent == "plain":  # the attack works on the control: exact rows, means and labels
            assert status["samples"] == rows[agent] and labels == label_sets[agent]
            exact = decode_stats(stats)
            assert exact.count[10] == rows[agent] and np.allclose(exact.mean, data[agent].mean(axis=0))
            continue
        assert status["samples"] is None and status["missing"] is None, (agent, status)
        assert labels is None, agent
        if agent != "ldpstats":
            assert stats is None, f"{agent} published statistics"
            continue
        noised = decode_stats(stats)  # only noised (and accounted in its status) statistics
        assert status["stats_privacy"]["releases"] == 1 and status["stats_privacy"]["epsilon"] > 0
        assert not np.array_equal(noised.count, np.full(64, rows[agent]))
        assert np.abs(noised.mean - data[agent].mean(axis=0)).max() > 0.01
        assert (noised.min[noised.count > 0] == -16).all() and (noised.max[noised.count > 0] == 16).all()


def test_a_private_agent_does_not_count_its_skipped_labels_in_the_status():
    from edge_agent.agent import Agent
    from edge_agent.data import ArraySource
    from edge_agent.trainer import LocalTrainer
    from protocol.messages import ModelMessage, encode_model
    from protocol.model_spec import ModelSpec
    from protocol.privacy import GaussianMechanism

    spec = ModelSpec("sgd-classifier", 64, (0, 1))  # the data also holds labels 2..9: rows skipped
    model = encode_model(ModelMessage(TOPICS.fleet, 1, spec, np.zeros(spec.n_params)))
    for dp, counted in ((None, True), (GaussianMechanism(1.0, 1.0), False)):
        agent = Agent("a", TOPICS, ArraySource(X[:100], Y[:100]), LocalTrainer(random_state=0), seed=0, dp=dp)
        assert agent.on_model(model) and agent.make_update() is not None
        assert ("skipped_labels" in agent.status()) is counted


def test_the_coordinator_takes_the_classes_from_its_flags_under_local_dp(capsys):
    from coordinator.cli import parse_args

    base = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier", "--n-features", "64",
            "--dp-mode", "local", "--dp-clip", "1", "--dp-noise", "1"]
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "give --classes" in capsys.readouterr().err
    assert parse_args(base + ["--classes", "0,1"]).spec.classes == (0, 1)
