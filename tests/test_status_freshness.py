"""The agent's retained status keeps up with its updates (issue 22 point 4): a real coordinator
and a real agent process on a real mosquitto; the status was 60 s behind (the heartbeat) before."""

from __future__ import annotations

import numpy as np

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_update
from protocol.tabular import write_csv
from protocol.topics import Topics

FLEET = "fresh"
T = Topics(FLEET)
WAIT = 30
BOUND = 5 + 1  # version_status_bound + the agent's --poll-interval


def test_status_shows_each_new_version_within_the_bound(tmp_path, mosquitto):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    write_csv(tmp_path / "a.csv", X, (X[:, 0] > 0).astype(int))
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                  "--n-features", 4, "--classes", "0,1", "--publish-interval", "0.2", log=tmp_path / "coord.log")
    agent = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "a0", "--data", tmp_path / "a.csv",
                  "--poll-interval", "1", log=tmp_path / "agent.log")
    try:
        def bases() -> list[int]:
            return [decode_update(p, "a0").base_version for topic, p in watcher.history if topic == T.update("a0")]

        watcher.wait_for(lambda: bases() and (watcher.json(T.agent_status("a0")) or {}).get("updates_sent", 0) >= 1,
                         WAIT, "a status counting the first update")
        watcher.wait_for(lambda: len(bases()) >= 8, WAIT, "eight updates")
        newest = bases()[-1]
        status = watcher.wait_for(
            lambda: (s := watcher.json(T.agent_status("a0"))) and (s["version"] or -1) >= newest and s, 2 * BOUND,
            f"the status to show base version {newest} (within {BOUND} s, 2x for a busy machine)")
        assert status["updates_sent"] >= 8 and status["model_version"] >= newest, status
    finally:
        assert stop(agent) == 0
        assert stop(coord) == 0
        watcher.close()
