"""Issue 20, point 2: scripts/tier-cluster brings up a 3-node JetStream cluster with MQTT listeners
and the partition mapping, and takes it down again on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import ROOT
from tier.cluster import PASSWORD_ENV, TIER_USER, partition_of

PASSWORD = "test-cluster-password"


def test_launcher_starts_a_partitioned_cluster_and_stops_it(tmp_path):
    proc = subprocess.Popen([str(ROOT / "scripts" / "tier-cluster"), "--dir", str(tmp_path / "c"), "--partitions", "3",
                             "--shared-device-user"],  # its publishers stand for 12 agents without credentials
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, PASSWORD_ENV: PASSWORD})
    try:
        ready = {}
        reader = threading.Thread(target=lambda: ready.update(json.loads(proc.stdout.readline() or "{}")), daemon=True)
        reader.start()
        reader.join(60)
        assert len(ready.get("mqtt", [])) == 3 and ready["partitions"] == 3, proc.stderr.read() if proc.poll() else ready
        ports = [int(url.rsplit(":", 1)[1]) for url in ready["mqtt"]]
        seen: dict[str, set] = {}
        done = threading.Event()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="w", protocol=mqtt.MQTTv311)
        sub.on_message = lambda c, u, m: (seen.setdefault(m.topic.split("/")[4], set()).add(m.topic.split("/")[3]),
                                          len(seen) == 12 and sum(map(len, seen.values())) == 12 and done.set())
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.username_pw_set(TIER_USER, PASSWORD)  # a device may not read the partitions' subjects
        # subscribed on every CONNACK: a subscribe paho sends outside a connection (one a busy node closed before its
        # CONNACK, say) is never sent again after its reconnect; one fresh-clone CI saw no SUBACK in 60 s
        sub.on_connect = lambda c, u, f, rc, p: rc.is_failure or c.subscribe("fedmq/f/upd/+/+", 1)
        sub.connect("127.0.0.1", ports[2])
        sub.loop_start()
        assert subscribed.wait(60), "no SUBACK from the third node"  # a QoS 1 subscription is a JetStream consumer: 20 s was short at CI load
        pubs = []
        for port in ports[:2]:  # two nodes publish the same agents: each still lands on one partition
            p = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"p{port}", protocol=mqtt.MQTTv311)
            p.connect("127.0.0.1", port)
            p.loop_start()
            pubs.append(p)
        for _ in range(10):  # until the subscription has spread over the routes (seconds at load 10)
            for p in pubs:
                for a in range(12):
                    p.publish(f"fedmq/f/update/a{a}", b"x", qos=1).wait_for_publish(10)
            if done.wait(3):
                break
        assert len(seen) == 12 and all(len(parts) == 1 for parts in seen.values()), seen
        assert len({next(iter(parts)) for parts in seen.values()}) == 3  # all 3 partitions used
        assert all(parts == {str(partition_of(a, 3))} for a, parts in seen.items())  # the workers' hash agrees
        for c in (sub, *pubs):
            c.loop_stop()
            c.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    out = subprocess.run(["pgrep", "-f", str(tmp_path / "c")], capture_output=True, text=True)
    assert out.stdout.strip() == ""  # no nats-server left behind
