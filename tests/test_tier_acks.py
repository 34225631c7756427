"""Per-agent acks on the scale-out tier (docs/architecture.md, "Acks on the tier"): a partition worker sends them as
core NATS messages on the ack topic's subject, not as retained MQTT messages (one R3 store per update at fleet scale).

Real nats-server, root, worker and edge_agent: the agent's acks reach it (a tier-user subscriber of its ack topic sees
them rise), nothing of them is in the MQTT listener's retained-message stream, the agent with a short --unheard-after
is never `unheard`, and after its node restarts (the agent reconnects, an ack may have gone out while it was away)
the next ack covers what it sent before: still not `unheard`.
Seen red with the retained QoS 1 acks (a `$MQTT.rmsgs...ack...` subject in the stream) and with the acks not sent
(no ack at the subscriber, the agent `unheard`).
"""

from __future__ import annotations

import json
import threading
import time

from fleet import spawn
from protocol.acks import decode_ack
from tier.cluster import NatsCluster
from tier.fleet import FLEET, START_S, TOPICS, ModelWatch, Tier, regression_shard, wait_until
from tier.mqtt_link import Link, parse_urls
from tier.nats_io import Nats

AGENT = "dev-acked"
UNHEARD_AFTER = 8  # the agent's bound (s): the run below lasts several of them
RETAINED_STREAM = "$MQTT_rmsgs"  # where the NATS MQTT listener keeps retained messages


class AckTap:
    """The tier user on the agent's ack and status topics, re-subscribed on every (re)connection."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.acks: list[int] = []
        self.states: list[str] = []
        self.lock = threading.Lock()
        self.link = Link(parse_urls(cluster.mqtt_urls), "test-ack-tap", persistent=False, on_message=self._on_message,
                         on_connect=lambda c, *a: c.subscribe([(TOPICS.ack(AGENT), 1), (TOPICS.agent_status(AGENT), 1)]))
        self.link.start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            if msg.topic == TOPICS.ack(AGENT):
                self.acks.append(decode_ack(msg.payload))
            else:
                self.states.append(json.loads(msg.payload).get("state"))

    def newest(self) -> int:
        with self.lock:
            return max(self.acks, default=-1)


def _retained_subjects(cluster: NatsCluster) -> dict[str, int]:
    """Subject -> count of the MQTT listener's retained-message stream (read with the tier user)."""
    nats = Nats(cluster.nats_urls, FLEET, replicas=cluster.replicas)
    try:
        info = nats.call(lambda: nats.js.stream_info(RETAINED_STREAM, subjects_filter=">"))
        return dict(info.state.subjects or {})
    finally:
        nats.call(nats.nc.close)


def test_tier_acks_reach_the_agent_unretained_and_it_stays_heard_across_a_reconnect(tmp_path):
    with NatsCluster(tmp_path / "nats", nodes_count=1, partitions=4) as cluster:
        tier = Tier(cluster, tmp_path, partitions=4, buffer_size=1)
        watch, tap, agent = ModelWatch(cluster), AckTap(cluster), None
        log = tmp_path / "agent.log"
        try:
            tier.start_root()
            tier.start_worker()
            assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
            agent = spawn("edge_agent", "--broker", cluster.mqtt_urls[0], "--fleet", FLEET, "--id", AGENT,
                          "--data", regression_shard(tmp_path / "agent.csv"), "--train-every", "0.5",
                          "--unheard-after", UNHEARD_AFTER, "--connect-timeout", "20", log=log)
            assert wait_until(lambda: len(set(tap.acks)) >= 3, 120), (tap.acks, log.read_text()[-2000:], tier.logs())
            assert tap.acks == sorted(tap.acks)  # cumulative: each the agent's highest accepted seq so far

            subjects = _retained_subjects(cluster)
            assert any(".model" in s for s in subjects), subjects  # the stream read is the one holding the model
            assert not [s for s in subjects if ".ack." in s], subjects

            before = tap.newest()
            cluster.restart(0)  # the agent's (only) node: it reconnects, an ack may have gone out while it was away
            assert wait_until(lambda: tap.newest() > before, 120), (tap.acks, log.read_text()[-2000:], tier.logs())
            back, after = time.monotonic(), tap.newest()
            # past the bound after the reconnect, acks still coming: whatever was pending before it was covered
            assert wait_until(lambda: time.monotonic() - back > 1.5 * UNHEARD_AFTER and tap.newest() > after,
                              4 * UNHEARD_AFTER), (tap.acks, log.read_text()[-2000:])
            text = log.read_text()
            assert text.count("sent update") >= 3 and "lost the broker" in text, text[-2000:]
            assert "acknowledged no update" not in text, text[-2000:]
            assert tap.states and "unheard" not in tap.states, tap.states
        finally:
            if agent is not None:
                agent.kill()
                agent.wait(10)
            tap.link.close()
            watch.close()
            tier.stop()
