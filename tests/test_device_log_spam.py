"""A device says a problem once, then counts it in its status (issue 22 point 7): a real
coordinator, a real agent process and mosquitto; labels the model lacks and garbage on the
model topic used to be warned about every round / every message, forever."""

from __future__ import annotations

import numpy as np

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_update
from protocol.tabular import write_csv
from protocol.topics import Topics

FLEET = "spam"
T = Topics(FLEET)
WAIT = 30


def test_label_skips_and_unusable_models_are_said_once_then_counted(tmp_path, mosquitto):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    write_csv(tmp_path / "a.csv", X, np.arange(60) % 3)  # label 2 is not one of the fleet's classes
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                  "--n-features", 4, "--classes", "0,1", "--publish-interval", "0.2", log=tmp_path / "coord.log")
    log = tmp_path / "agent.log"
    agent = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "a0", "--data", tmp_path / "a.csv",
                  log=log)
    try:
        def updates() -> int:
            return sum(1 for topic, _ in watcher.history if topic == T.update("a0"))

        watcher.wait_for(lambda: updates() >= 6, WAIT, "six rounds")
        for _ in range(5):  # garbage on the model topic (not retained: the coordinator's model stays)
            watcher.client.publish(T.model, b"\xc1 not a model", qos=1).wait_for_publish(WAIT)
        status = watcher.wait_for(
            lambda: (s := watcher.json(T.agent_status("a0"))) and s.get("unusable_models", 0) >= 5 and s, 15,
            "the status to count five unusable models")
        assert status["skipped_labels"] == 20, status
        assert all(decode_update(p, "a0").n_samples == 40 for topic, p in watcher.history if topic == T.update("a0"))
    finally:
        assert stop(agent) == 0
        assert stop(coord) == 0
        watcher.close()
    text = log.read_text()
    assert text.count("whose label is not one of the model's classes") == 1, text
    assert text.count("ignoring an unusable model message") == 1, text
