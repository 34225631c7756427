"""Pace steering with real processes: the fleet's update rate follows --target-updates-per-s as the fleet grows.

Real mosquitto, a real coordinator (fedasync, publishing every 0.2 s) and agent processes that,
unsteered, train on every newer model: 4 agents and then 12. With --target-updates-per-s 4 the
model asks each device to report every agents/4 s, so the updates counted on the broker stay
near 4/s at both sizes. Seen red without the steering (coordinator flag dropped): the rate
was far above the target at 4 agents and grew with the fleet.
"""

from __future__ import annotations

import time

from fleet import TopicWatcher, spawn, stop
from protocol.tabular import write_csv
from protocol.topics import Topics
from simulation.datasets import load_dataset

FLEET = "paced"
T = Topics(FLEET)
TARGET = 4.0


def _rate(watcher: TopicWatcher, seconds: float) -> float:
    """Updates a second seen on the broker over the next `seconds`."""
    with watcher._cond:
        first = len(watcher.history)
    time.sleep(seconds)  # a measuring window, not synchronisation
    with watcher._cond:
        return (len(watcher.history) - first) / seconds


def _senders(watcher: TopicWatcher) -> set[str]:
    return {T.agent_of_update(topic) for topic, _ in watcher.history}


def test_the_update_rate_stays_near_the_target_from_4_to_12_agents(tmp_path, mosquitto):
    ds = load_dataset("digits", seed=0)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"agent{i}.csv")
        write_csv(paths[-1], ds.X_train[i * 40:(i + 1) * 40], ds.y_train[i * 40:(i + 1) * 40])
    updates = TopicWatcher(mosquitto.port, T.all_updates)
    status = TopicWatcher(mosquitto.port, T.coordinator_status)
    online = lambda n: lambda: ((status.json(T.coordinator_status) or {}).get("pace") or {}).get("agents_online") == n  # noqa: E731
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                        "--classes", ",".join(map(str, ds.classes)), "--n-features", ds.n_features,
                        "--strategy", "fedasync", "--publish-interval", "0.2", "--max-staleness", "1000",
                        "--target-updates-per-s", TARGET, "--pace-min-interval", "0.5",
                        log=tmp_path / "coordinator.log")
    agents = []
    start = lambda ids: [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"agent{i}",  # noqa: E731
                               "--data", paths[i], "--seed", i, log=tmp_path / f"agent{i}.log") for i in ids]
    try:
        agents += start(range(4))
        status.wait_for(online(4), 40, "4 agents online")
        updates.wait_for(lambda: len(_senders(updates)) == 4, 40, "an update from each of 4 agents")
        time.sleep(1.5)  # every agent has taken a model carrying the 4-agent pace (one interval and a half)
        small = _rate(updates, 6.0)

        agents += start(range(4, 12))
        status.wait_for(online(12), 60, "12 agents online")
        updates.wait_for(lambda: len(_senders(updates)) == 12, 60, "an update from each of 12 agents")
        time.sleep(4.5)  # one 12-agent interval and a half: all have the new pace
        large = _rate(updates, 9.0)
    finally:
        for proc in agents:
            stop(proc)
        code = stop(coordinator)
        updates.close()
        status.close()
    print(f"updates/s: {small:.2f} with 4 agents, {large:.2f} with 12 (target {TARGET})")
    assert code == 0
    assert 0.5 * TARGET <= small <= 1.5 * TARGET, small
    assert 0.5 * TARGET <= large <= 1.5 * TARGET, large  # unsteered: about 3x the 4-agent rate
    assert large < 1.6 * small, (small, large)
