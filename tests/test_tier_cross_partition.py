"""An update published straight onto another partition's subject is refused, not counted twice (red team).

The account mapping sends `fedmq/<fleet>/update/<agent>` to `fedmq.<fleet>.upd.<partition(N, agent)>.<agent>`,
and each partition dedups (agent, seq) over its own agents only. But the mapped subject is itself an MQTT topic a
device can publish on (`fedmq/<fleet>/upd/<Q>/<agent>`, the tier's cluster has no authorization), so the same
valid update sent on its own topic and again on another partition's subject reached two partitions, each folding
it once: one update counted twice (the replay check bypassed), and a device could put any agent in any
partition. A real nats-server (4 partitions), the root (one update per step) and a worker as processes, one
paho MQTT 3.1.1 client. Checked: the root folds the update once, the copy is counted as a `topic` refusal.
Seen red before the worker checked partition_of: folded 2, no refusal.
"""

from __future__ import annotations

import numpy as np

from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.cluster import partition_of
from tier.fleet import FLEET, TOPICS, device_on_a_tier, wait_until

EVIL = "evil-1"


def test_an_update_on_another_partitions_subject_is_refused_not_folded_twice(tmp_path, nats_node):
    with device_on_a_tier(nats_node, tmp_path, EVIL, buffer_size=1) as (tier, watch, evil, model):
        rng = np.random.default_rng(0)
        update = encode_update(UpdateMessage(EVIL, 1, model.version, 10,
                                             codec.encode(rng.normal(size=model.spec.n_params) * 0.01, "float32", rng)))
        own = partition_of(EVIL, nats_node.partitions)
        other = (own + 1) % nats_node.partitions
        evil.publish(TOPICS.update(EVIL), update, qos=1).wait_for_publish(10)
        evil.publish(f"fedmq/{FLEET}/upd/{other}/{EVIL}", update, qos=1).wait_for_publish(10)
        assert wait_until(lambda: watch.status.get("folded", 0) >= 1
                          and (watch.status.get("updates_rejected") or {}).get("topic", 0) >= 1, 60), \
            (watch.status, tier.logs())
        assert watch.status["folded"] == 1, watch.status
        assert watch.status["updates_rejected"] == {"topic": 1}, watch.status
