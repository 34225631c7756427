"""The tier's NATS authorization (tier/cluster.py `authorization_users`): an MQTT client without credentials
gets a device's rights only (the red team's probe, notes of wred).

A real nats-server, the root (buffer 1) and a worker as processes, one real edge_agent, and one MQTT 3.1.1 client
without credentials (paho) that tries what only tier processes may: a forged partial on the root's
`fedmq/<fleet>/partial/<P>` with epoch 2^62 (before authorization one such message was folded and fenced the
partition for good: the root's version stayed put), a forged retained model of version 10^9 (the workers and
devices would have adopted it), a publish on the node's own retained-message subjects (`$MQTT/rmsgs`: with publish allowed on `$MQTT.>`,
one such message kept the retained model from every later subscriber), and a subscription to every partial sum. Checked: the root's version keeps
advancing with the real agent's updates, the forged partial's agent never appears in the root's audit log, no
subscriber sees the forged model, and the client receives no partial. Seen red without `authorization` in the
node config (the partial folded as "ghost", the version stuck; the subscriber read the partials).
"""

from __future__ import annotations

import threading

import numpy as np

from fleet import spawn
from protocol.messages import ModelMessage, encode_model
from protocol.model_spec import ModelSpec
from tier.cluster import partition_of
from tier.fleet import (FLEET, N_FEATURES, START_S, TOPICS, ModelWatch, Tier, device_client, online, regression_shard,
                        wait_until)
from tier.partial import Partial, encode_partial

AGENT = "dev-auth-1"
FORGED_VERSION = 10 ** 9


def test_a_client_without_credentials_cannot_forge_partials_or_models_nor_read_partials(tmp_path, nats_node):
    tier = Tier(nats_node, tmp_path, partitions=nats_node.partitions, buffer_size=1)
    watch = ModelWatch(nats_node)  # the tier user: sees every retained model, forged or not
    partition = partition_of(AGENT, nats_node.partitions)
    subscribed = threading.Event()
    read: list[str] = []
    evil, connected = device_client("evil-auth")
    evil.on_subscribe = lambda *a: subscribed.set()
    evil.on_message = lambda c, u, m: read.append(m.topic)
    agent = None
    try:
        tier.start_root()
        tier.start_worker()
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        start = watch.version
        online(evil, connected, nats_node.nodes[0])
        evil.subscribe(f"fedmq/{FLEET}/partial/+", 0)
        assert subscribed.wait(30)
        forged = Partial(partition, 2 ** 62, 1, np.zeros(N_FEATURES + 1), 1.0, 1, [("ghost", 1, 0)])
        evil.publish(f"fedmq/{FLEET}/partial/{partition}", encode_partial(forged), qos=1).wait_for_publish(10)
        spec = ModelSpec("sgd-regressor", N_FEATURES)
        evil.publish(TOPICS.model, encode_model(ModelMessage(FLEET, FORGED_VERSION, spec, np.zeros(spec.n_params))),
                     qos=1, retain=True).wait_for_publish(10)
        for topic in ("$MQTT/rmsgs", f"$MQTT/rmsgs/fedmq/{FLEET}/model"):  # the node's retained-message store
            evil.publish(topic, b"forged", qos=1).wait_for_publish(10)
        agent = spawn("edge_agent", "--broker", nats_node.mqtt_urls[0], "--fleet", FLEET, "--id", AGENT,
                      "--data", regression_shard(tmp_path / "agent.csv"), log=tmp_path / "agent.log")
        # the real agent trains through the tier: version after version (a fenced partition would stop at one)
        assert wait_until(lambda: watch.version >= start + 3, 180), \
            (watch.version, (tmp_path / "agent.log").read_text()[-2000:], tier.logs())
        assert watch.version < FORGED_VERSION, watch.version
        audit = tier.audit.read_text() if tier.audit.exists() else ""
        assert AGENT in audit and "ghost" not in audit, audit[-2000:]
        assert read == [], read[:5]  # the worker's partials were published all along
        assert connected.is_set() and evil.is_connected()  # refused messages, not a cut connection
    finally:
        if agent is not None:
            agent.kill()
            agent.wait(10)
        evil.loop_stop()
        evil.disconnect()
        watch.close()
        tier.stop()
