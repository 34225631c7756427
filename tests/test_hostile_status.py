"""Red team, issue 18 point 5: one device's own status topic must not end the coordinator's network loop.

An agent with a valid credential publishes on agent/<its id>/status (the ACL lets it). A
status whose state is a JSON list or map (unhashable) raised TypeError out of
coordinator/presence.py inside paho's on_message, which ends paho's network thread: the
coordinator stayed up but folded nothing more. Real mosquitto, coordinator and agent
processes; seen red on main (the version stayed put after the hostile status).
"""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import TopicWatcher, real_fleet, spawn, stop, write_shards
from protocol.tabular import write_csv
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.partition import partition

FLEET = "hostilestatus"
T = Topics(FLEET)
HOSTILE = [{"state": []}, {"state": {"online": 1}}, {"state": 7}, {"state": None}, ["online"]]


def _status(watcher) -> dict:
    return watcher.json(T.coordinator_status) or {}


def test_a_status_with_an_unhashable_state_is_refused_and_the_fleet_goes_on(tmp_path, mosquitto):
    ds = load_dataset("digits", seed=0)
    shards = write_shards(tmp_path, ds, partition(ds.y_train, 2, "iid", seed=0), prefix="agent")
    watcher = TopicWatcher(mosquitto.port, T.everything)
    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil")
    try:
        with real_fleet(mosquitto, tmp_path, FLEET, ds, shards, "--strategy", "fedbuff", "--publish-interval", "0.3",
                        "--checkpoint-dir", tmp_path / "ckpt", agent_flags=("--train-every", "0.5")) as run:
            watcher.wait_for(lambda: _status(watcher).get("version", 0) >= 1, 60, "a first version")
            hostile.connect("127.0.0.1", mosquitto.port)
            hostile.loop_start()
            for payload in HOSTILE:
                hostile.publish(T.agent_status("evil"), json.dumps(payload), qos=1).wait_for_publish(10)
            refused = watcher.wait_for(lambda: (s := _status(watcher)).get("rejected", {}).get("status_decode", 0)
                                       >= len(HOSTILE) and s, 30, "the hostile statuses refused")
            version = refused["version"]
            watcher.wait_for(lambda: _status(watcher).get("version", 0) >= version + 3, 45,
                             "three more versions after the hostile statuses")
            assert _status(watcher)["buffer"]["live_agents"] == 2  # the hostile 'evil' is not counted online
            assert run.coordinator.poll() is None
    finally:
        hostile.loop_stop()
        hostile.disconnect()
        watcher.close()
    assert run.code == 0


def test_a_retained_schema_with_a_list_label_does_not_wedge_schema_discovery(tmp_path, mosquitto):
    """Red team, issue 18 point 6: labels [[1]] raised TypeError out of the discovery's paho
    on_message; its network thread ended and the coordinator never fixed a spec. Seen red: no
    version within the bound."""
    import msgpack

    from protocol.messages import FORMAT_VERSION

    ds = load_dataset("digits", seed=0)
    write_csv(tmp_path / "agent.csv", ds.X_train[:300], ds.y_train[:300])
    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil")
    hostile.connect("127.0.0.1", mosquitto.port)
    hostile.loop_start()
    bad = msgpack.packb({"format": FORMAT_VERSION, "type": "schema", "columns": ["x"], "labels": [[1]]}, use_bin_type=True)
    hostile.publish(T.schema("evil"), bad, qos=1, retain=True).wait_for_publish(10)
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                        "--publish-interval", "0.3", "--checkpoint-dir", tmp_path / "ckpt", log=tmp_path / "coordinator.log")
    agent = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "agent0", "--data",
                  tmp_path / "agent.csv", log=tmp_path / "agent.log")
    try:
        watcher.wait_for(lambda: _status(watcher).get("version", 0) >= 1, 60, "a spec discovered and a first version")
    finally:
        hostile.loop_stop()
        hostile.disconnect()
        stop(agent)
        code = stop(coordinator)
        watcher.close()
    assert code == 0
