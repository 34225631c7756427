"""Issue 20, point 1: devices, unchanged, speak MQTT 3.1.1 to the NATS MQTT listener.

A real nats-server (the PyPI wheel) with the tier's partition mapping; the real agent process
with its default protocol receives the retained model through NATS, trains and publishes; its
update arrives on the partition topic of its agent id. The same agent asked for MQTT 5 stops
with one line that names the fix (NATS refuses MQTT 5)."""

from __future__ import annotations

import threading

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import spawn
from protocol.messages import ModelMessage, decode_update, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from protocol.topics import Topics
from tier.cluster import TIER_USER, tier_password

FLEET = "natsf"
TOPICS = Topics(FLEET)


def _client(port: int, client_id: str, persistent: bool = False) -> mqtt.Client:
    """A tier process's client (the tier user): it reads the partitions' subjects and owns the model."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(TIER_USER, tier_password())
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c


def _data(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    path = tmp_path / "agent.csv"
    write_csv(path, X, y)
    return path


def test_agent_speaks_311_to_nats_and_gets_the_retained_model(tmp_path, nats_node):
    node = nats_node.nodes[0]
    spec = ModelSpec("sgd-classifier", 3, (0, 1))
    got: list[mqtt.MQTTMessage] = []
    arrived = threading.Event()
    sub = _client(node.mqtt_port, "test-partition-sub")

    def on_message(client, userdata, msg):
        got.append(msg)
        arrived.set()

    sub.on_message = on_message
    sub.subscribe(f"fedmq/{FLEET}/upd/+/+", 1)[1]
    owner = _client(node.mqtt_port, "test-model-owner")
    owner.publish(TOPICS.model, encode_model(ModelMessage(FLEET, 7, spec, np.zeros(spec.n_params))),
                  qos=1, retain=True).wait_for_publish(10)
    agent = spawn("edge_agent", "--broker", node.mqtt_url, "--fleet", FLEET, "--id", "dev-3",
                  "--data", _data(tmp_path), log=tmp_path / "agent.log")
    try:
        assert arrived.wait(60), (tmp_path / "agent.log").read_text()[-2000:]
        msg = got[0]
        # the mapping put it on partition(4, "dev-3"), the same for every message of this agent
        prefix, fleet, upd, part, agent_id = msg.topic.split("/")
        assert (prefix, fleet, upd, agent_id) == ("fedmq", FLEET, "upd", "dev-3") and 0 <= int(part) < 4
        update = decode_update(msg.payload, "dev-3")
        assert update.base_version == 7  # trained on the retained model it got through NATS
    finally:
        agent.kill()
        agent.wait(10)
        for c in (sub, owner):
            c.loop_stop()
            c.disconnect()


def test_agent_asked_for_mqtt5_stops_with_one_line(tmp_path, nats_node):
    node = nats_node.nodes[0]
    log = tmp_path / "agent5.log"
    agent = spawn("edge_agent", "--broker", node.mqtt_url, "--fleet", FLEET, "--id", "dev-5",
                  "--data", _data(tmp_path), "--mqtt-version", "5", "--connect-timeout", "10", log=log)
    assert agent.wait(40) != 0
    text = log.read_text()
    lines = [line for line in text.splitlines() if "3.1.1" in line]
    assert len(lines) == 1 and "MQTT 5" in lines[0] and "--mqtt-version 3.1.1" in lines[0], text
    assert "Traceback" not in text
