"""Forged counts through the tier: malformed partition counts on the root's partials subjects, sent by a device over
MQTT (the red team, bc04eb1), and a device's inflated sample counts in its updates (issue 18 point 3).

The NATS MQTT listener maps a topic to the subject of the same levels: a client's
`fedmq/<fleet>/partial/<P>/counts` is the root's `fedmq.<fleet>.partial.<P>.counts`, stored in the partials'
stream and fetched by the root like a worker's. Since the tier's authorization (tests/test_tier_auth.py) a device
without credentials may not publish there; the client here holds the tier user's password (a leaked credential,
or a buggy tier process), and the root must still refuse what no worker sends. A real nats-server, the root and a
worker as processes, one MQTT 3.1.1 client (paho). It sends counts messages a worker never sends: an Inf count,
a count of 1e300 (a float), a negative one, a string, a count for a partition other than its subject's, one for
a partition the fleet has not, a thousand reasons. Checked: none is folded (the root's `rejected` counts them,
its status never shows them), no process exits or logs a traceback, and the refusal a worker then reports
(the client's undecodable update) still reaches the root's status. The refusals alone reach the status too (seen
red before the root republished it for a grown `rejected`: a fenced or forged partial showed only with the next
model). Seen red on the old decoder: the Inf count
raised OverflowError out of the fold, the root went back to standby, took over again and fetched the same
message again (a crash loop, 33 takeovers in 90 s; the later refusal never reached the status). A 1e300 count,
kept by the max-merge, would have made every later checkpoint unpackable (msgpack.packb raises OverflowError on
int(1e300)), so the root would never have committed again.

Inflated sample counts: 4 honest devices' updates claim 50 samples, one's 10^6 (before the partition's sample cap
has warmed up, nothing else bounds it), its delta the honest one's opposite. The root's step may give it no more
than one row's share of its buffer of 5, as the single coordinator's FedBuff does (the lower median caps, in the
partial and at the root: tier/steps.py). Seen red with both caps off: its share of the step was 0.9998.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.cluster import TIER_USER
from tier.fleet import (FLEET, START_S, TOPICS, ModelWatch, Tier, device_client, device_on_a_tier, online,
                        wait_until)


def _counts(partition, rejected) -> bytes:
    return msgpack.packb({"v": 1, "kind": "counts", "partition": partition, "rejected": rejected, "excluded": {}},
                         use_bin_type=True)


FORGED = [  # (topic partition, payload)
    (0, _counts(0, {"decode": float("inf")})),
    (0, _counts(0, {"decode": 1e300})),
    (0, _counts(0, {"decode": -5, "shape": "7"})),
    (1, _counts(0, {"norm": 3})),  # not its subject's partition
    (99, _counts(99, {"norm": 3})),  # no such partition
    (0, _counts(0, {f"r{i}": 1 for i in range(1000)})),
    (0, _counts(0, {"x" * 3000: 1})),
]


def test_forged_counts_on_the_partials_subject_are_refused_and_the_root_goes_on(tmp_path, nats_node):
    tier = Tier(nats_node, tmp_path, partitions=nats_node.partitions)
    watch = ModelWatch(nats_node)
    evil, connected = device_client("evil-1", TIER_USER, nats_node.password)
    try:
        tier.start_root()
        tier.start_worker()
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        online(evil, connected, nats_node.nodes[0])
        for partition, payload in FORGED:
            evil.publish(f"fedmq/{FLEET}/partial/{partition}/counts", payload, qos=1).wait_for_publish(10)
        # refused partials alone (nothing else changed) still reach the status, within a publish interval
        assert wait_until(lambda: watch.status.get("rejected", 0) >= len(FORGED), 60), (watch.status, tier.logs())
        evil.publish(TOPICS.update("evil-1"), b"\xc1 not msgpack", qos=1).wait_for_publish(10)
        assert wait_until(lambda: (watch.status.get("updates_rejected") or {}).get("decode") == 1, 90), \
            (watch.status, tier.logs())
        assert watch.status["updates_rejected"] == {"decode": 1}, watch.status
        assert wait_until(lambda: watch.status.get("rejected", 0) >= len(FORGED), 30), watch.status
        assert all(p.poll() is None for p in [*tier.roots.values(), *tier.workers.values()]), tier.logs()
        assert not [p.name for p in tmp_path.glob("*.log") if "Traceback" in p.read_text(errors="replace")], tier.logs()
    finally:
        evil.loop_stop()
        evil.disconnect()
        watch.close()
        tier.stop()


INFLATED = 10 ** 6  # the hostile device's claimed sample count; the honest devices' is 50


def test_a_device_claiming_inflated_counts_owns_one_row_of_the_roots_step_not_the_step(tmp_path, nats_node):
    with device_on_a_tier(nats_node, tmp_path, "inflating", ("--buffer-timeout", "60")) as (tier, watch, devices, base):
        rng = np.random.default_rng(0)
        honest = np.full(base.spec.n_params, 0.01)
        sent = [("evil-1", -honest, INFLATED)] + [(f"dev-{i}", honest, 50) for i in range(4)]
        for agent, delta, count in sent:
            update = UpdateMessage(agent, 1, base.version, count, codec.encode(delta, "float32", rng))
            devices.publish(TOPICS.update(agent), encode_update(update), qos=1).wait_for_publish(10)
        assert watch.wait_version_above(base.version, 60) is not None, (watch.status, tier.logs())
        step = watch.latest.params - base.params
        share = float((honest @ step - honest @ honest) / (-2 * honest @ honest))  # of the hostile delta in the step
        assert share == pytest.approx(0.2, abs=1e-4), (share, watch.status)
