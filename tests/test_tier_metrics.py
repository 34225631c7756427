"""Issue 20: Prometheus metrics of the tier's root and partition workers (`--metrics-port`, tier/metrics.py).

A real nats-server, two roots (the active one and a standby) and one worker as processes, each with
--metrics-port; devices publish updates and one client an undecodable payload. Scraped over HTTP: the
active root's version, updates folded, partials and refusals by reason, its lease (active 1, the standby
0); the worker's partitions owned with their lease epochs, updates folded and refusals by partition.
Seen red with the flag's exporter not started (connection refused) and with the root's refusal counts
left out of its metrics.
"""

from __future__ import annotations

import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fleet import spawn
from simulation.mosquitto import free_port
from tier.cluster import partition_of
from tier.fleet import FLEET, START_S, TOPICS, ModelWatch, Publisher, Tier, wait_until

EVIL = "evil-1"


def _scrape(port: int) -> dict[tuple, float]:
    """(sample name, sorted labels but fleet) -> value, from a real GET /metrics."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "fleet"))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples if s.labels.get("fleet") == FLEET}


def test_the_root_and_a_worker_serve_their_metrics(tmp_path, nats_node):
    tier = Tier(nats_node, tmp_path, partitions=nats_node.partitions)
    ports = {name: free_port() for name in ("root1", "root2", "worker1")}
    common = tier._common()
    procs = [spawn("tier.root", *common, *tier.spec_args, "--partitions", nats_node.partitions, "--buffer-size", 5,
                   "--buffer-timeout", 1, "--id", name, "--metrics-port", ports[name], log=tmp_path / f"{name}.log")
             for name in ("root1", "root2")]
    procs.append(spawn("tier.worker", *common, "--partitions", nats_node.partitions, "--id", "worker1",
                       "--metrics-port", ports["worker1"], log=tmp_path / "worker1.log"))
    watch = ModelWatch(nats_node)
    publisher = evil = None
    try:
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        publisher = Publisher(nats_node, watch, agents=4, rate=10, connections=1)
        publisher.start()
        evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=EVIL, protocol=mqtt.MQTTv311)
        evil.connect("127.0.0.1", nats_node.nodes[0].mqtt_port, 30)
        evil.loop_start()
        evil.publish(TOPICS.update(EVIL), b"\xc1 not msgpack", qos=1).wait_for_publish(10)
        assert watch.wait_version_above(2, 90) is not None, tier.logs()
        decode = ("fedmq_updates_rejected_total", (("reason", "decode"),))
        roots: dict = {}

        def counted() -> bool:  # the partition's refusal reached the active root
            roots.update({n: _scrape(ports[n]) for n in ("root1", "root2")})
            return any(m.get(decode) == 1 for m in roots.values())

        assert wait_until(counted, 60), (roots, tier.logs())
        active = next(n for n, m in roots.items() if m.get(("fedmq_tier_root_active", ())) == 1)
        standby = next(n for n in roots if n != active)
        m = roots[active]
        assert roots[standby].get(("fedmq_tier_root_active", ())) == 0, roots[standby]
        assert m[("fedmq_model_version", ())] >= 3 and m[("fedmq_tier_lease_epoch", ())] >= 1
        assert m[("fedmq_updates_accepted_total", ())] >= 5 and m[("fedmq_tier_partials_folded_total", ())] >= 1
        assert m[("fedmq_tier_partials_rejected_total", ())] == 0
        assert m[("fedmq_uptime_seconds", ())] > 0  # the root's status's uptime_s, read per scrape
        # K = 5 shrinks to the publisher's 4 agents heard (the hostile one's refused update is in no partial)
        assert m[("fedmq_buffer_size", ())] == 5
        def shrunk() -> bool:
            now = _scrape(ports[active])
            return (now.get(("fedmq_buffer_effective_size", ())), now.get(("fedmq_tier_heard_agents", ()))) == (4, 4)

        assert wait_until(shrunk, 30), (_scrape(ports[active]), tier.logs())

        w = _scrape(ports["worker1"])
        owned = nats_node.partitions
        assert w[("fedmq_tier_partitions_owned", ())] == owned, w
        parts = [str(p) for p in range(owned)]
        assert all(w[("fedmq_tier_partition_epoch", (("partition", p),))] >= 1 for p in parts), w
        assert sum(w[("fedmq_updates_accepted_total", (("partition", p),))] for p in parts) >= 5
        assert sum(w[("fedmq_tier_partials_total", (("partition", p),))] for p in parts) >= 1
        evil_p = str(partition_of(EVIL, owned))
        assert w[("fedmq_updates_rejected_total", (("partition", evil_p), ("reason", "decode")))] == 1, w
        assert w[("fedmq_model_version", ())] >= 0
    finally:
        if evil is not None:
            evil.loop_stop()
            evil.disconnect()
        if publisher is not None:
            publisher.close()
        watch.close()
        for proc in procs:
            proc.kill()
            proc.wait(10)
