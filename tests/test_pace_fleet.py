"""Pace steering with real processes: the fleet's update rate follows --target-updates-per-s as the fleet grows.

Real mosquitto, a real coordinator (fedasync, publishing every 0.2 s) and agent processes that,
unsteered, train on every newer model: 4 agents and then 12. With --target-updates-per-s 4 the
model asks each device to report every agents/4 s, so the updates counted on the broker stay
near 4/s at both sizes. Seen red without the steering (coordinator flag dropped): the rate
was far above the target at 4 agents and grew with the fleet.
"""

from __future__ import annotations

import time

from fleet import TopicWatcher, spawn, stop, stop_all
from protocol.messages import decode_update
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


def _wait_paced(watcher: TopicWatcher, version: int, n: int, timeout: float) -> None:
    """Until each of `n` agents sent an update trained on `version` or newer (published with the
    pace for `n` agents online): from then on every one of them reports at that pace."""
    start = len(watcher.history)
    seen: dict[int, str] = {}

    def paced() -> bool:
        for i in range(start, len(watcher.history)):
            if i not in seen:
                topic, payload = watcher.history[i]
                seen[i] = T.agent_of_update(topic) if decode_update(payload).base_version >= version else ""
        return len(set(seen.values()) - {""}) >= n

    watcher.wait_for(paced, timeout, f"an update from each of {n} agents on version {version} or newer")


def test_the_update_rate_stays_near_the_target_from_4_to_12_agents(tmp_path, mosquitto):
    ds = load_dataset("digits", seed=0)
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"agent{i}.csv")
        write_csv(paths[-1], ds.X_train[i * 40:(i + 1) * 40], ds.y_train[i * 40:(i + 1) * 40])
    updates = TopicWatcher(mosquitto.port, T.all_updates)
    status = TopicWatcher(mosquitto.port, T.coordinator_status)
    online = lambda n: lambda: ((s := status.json(T.coordinator_status) or {}).get("pace") or {}).get("agents_online") == n and s  # noqa: E731
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                        "--classes", ",".join(map(str, ds.classes)), "--n-features", ds.n_features,
                        "--strategy", "fedasync", "--publish-interval", "0.2", "--max-staleness", "1000",
                        "--target-updates-per-s", TARGET, "--pace-min-interval", "0.5",
                        "--no-feature-stats",  # written for the pace alone, before statistics were the default
                        log=tmp_path / "coordinator.log")
    agents = []
    start = lambda ids: [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"agent{i}",  # noqa: E731
                               "--data", paths[i], "--seed", i, log=tmp_path / f"agent{i}.log") for i in ids]
    try:
        agents += start(range(4))
        paced = status.wait_for(online(4), 40, "4 agents online")["version"] + 1  # a model made after it
        updates.wait_for(lambda: len(_senders(updates)) == 4, 40, "an update from each of 4 agents")
        _wait_paced(updates, paced, 4, 40)
        small = _rate(updates, 6.0)

        agents += start(range(4, 12))
        paced = status.wait_for(online(12), 60, "12 agents online")["version"] + 1
        updates.wait_for(lambda: len(_senders(updates)) == 12, 60, "an update from each of 12 agents")
        _wait_paced(updates, paced, 12, 60)
        large = _rate(updates, 9.0)
    finally:
        stop_all(agents)
        code = stop(coordinator)
        updates.close()
        status.close()
    print(f"updates/s: {small:.2f} with 4 agents, {large:.2f} with 12 (target {TARGET})")
    assert code == 0
    assert 0.5 * TARGET <= small <= 1.5 * TARGET, small
    assert 0.5 * TARGET <= large <= 1.5 * TARGET, large  # unsteered: about 3x the 4-agent rate
    assert large < 1.6 * small, (small, large)


def test_a_paced_round_trains_on_the_newest_model_not_the_held_one(mosquitto):
    """At its round a paced device listens again and trains on what that brings, even with --train-every
    and new rows due on the model it holds. Seen red with the round checked before resubscribing: the
    second update was based on version 1, the model held since the first round."""
    import threading

    import numpy as np
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.agent import Agent
    from edge_agent.data import ArraySource
    from edge_agent.session import AgentSession
    from edge_agent.trainer import LocalTrainer
    from protocol.messages import ModelMessage, encode_model
    from protocol.model_spec import ModelSpec
    from protocol.pace import Pace
    from protocol.transport import BrokerSettings

    ds = load_dataset("digits", seed=0)
    spec = ModelSpec("sgd-classifier", ds.n_features, tuple(ds.classes))
    updates = TopicWatcher(mosquitto.port, T.all_updates)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pace-publisher")
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()

    def publish(version: int) -> None:
        payload = encode_model(ModelMessage(FLEET, version, spec, np.zeros(spec.n_params), pace=Pace(3.0, 0.0)))
        publisher.publish(T.model, payload, qos=1, retain=True).wait_for_publish(10)

    agent = Agent("solo", T, ArraySource(ds.X_train[:40], ds.y_train[:40]), LocalTrainer(random_state=0), "int8",
                  seed=0, train_every=0.1)
    session = AgentSession(agent, BrokerSettings("127.0.0.1", mosquitto.port), status_interval=0, poll_interval=0.2)
    stop_event = threading.Event()
    thread = threading.Thread(target=session.run, args=(stop_event,), daemon=True)
    try:
        publish(1)
        thread.start()
        updates.wait_for(lambda: len(updates.history) >= 1, 30, "the first update")
        for version in range(2, 5):  # while the device waits out its 3 s interval
            publish(version)
        agent.new_samples_ = 10  # new rows: --train-every alone would train now, on the held version 1
        updates.wait_for(lambda: len(updates.history) >= 2, 30, "the second update")
    finally:
        stop_event.set()
        thread.join(15)
        publisher.loop_stop()
        publisher.disconnect()
        updates.close()
    bases = [decode_update(p).base_version for _, p in updates.history[:2]]
    assert bases == [1, 4], bases
