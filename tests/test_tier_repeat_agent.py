"""One agent sending update after update through the tier (issue 18 point 3: the fedbuff mean is bounded per agent
per buffer): its updates share one agent's weight in the root's buffer, and a buffer of K steps on K agents.

A real nats-server, the root (fedbuff, K = 5) and a worker as processes, one MQTT 3.1.1 client (paho) as the
devices. The hostile agent sends 8 updates while 4 honest ones send one each, interleaved; every update is sent
only once the root's audit log holds the one before, so each is in a partial of its own and in the root's buffer
before the next (the hostile agent at the partition's commit rate, its updates spread over partials as a fast
device's are). Its delta is the honest one's opposite. Checked: the buffer steps once, on the fifth agent (not on
the fifth update), the hostile agent owns a fifth of the step (one agent of 5, as the single coordinator's FedBuff
keeps one row per agent), the status counts its 7 repeats (`bounded.repeat_agent`), and every update is in the
audit exactly once (folded, none dropped). K stays 5 throughout: the root has not yet listened for its
--live-window (3 x --buffer-timeout 60), tests/test_tier_heard.py checks K once it has (5 agents heard, 5). Seen red on the code before: the root stepped on the hostile agent's
4 updates and one honest one (0.8 of that step), twice in the sequence, 1.1 of the honest step length moved away.
"""

from __future__ import annotations

import numpy as np
import pytest

from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.fleet import FLEET, TOPICS, check_exactly_once, device_on_a_tier, read_audit, wait_folded, wait_until

HOSTILE = "evil-1"
SEQUENCE = [HOSTILE] * 4 + ["dev-0", "dev-1"] + [HOSTILE] * 4 + ["dev-2", "dev-3"]


def test_one_agents_many_updates_share_one_agents_weight_in_the_roots_buffer(tmp_path, nats_node):
    with device_on_a_tier(nats_node, tmp_path, "repeating", ("--buffer-timeout", "60")) as (tier, watch, devices, base):
        rng = np.random.default_rng(0)
        honest = np.full(base.spec.n_params, 0.01)
        seqs: dict[str, int] = {}
        sent = []
        for agent in SEQUENCE:
            seqs[agent] = seqs.get(agent, 0) + 1
            delta = -honest if agent == HOSTILE else honest
            update = UpdateMessage(agent, seqs[agent], base.version, 50, codec.encode(delta, "float32", rng))
            devices.publish(TOPICS.update(agent), encode_update(update), qos=1).wait_for_publish(10)
            sent.append((agent, seqs[agent]))
            assert (agent, seqs[agent]) in {(r["agent"], r["seq"]) for r in wait_folded(tier.audit, sent, 60)}, \
                (sent[-1], watch.status, tier.logs())
        assert watch.wait_version_above(base.version, 60) is not None, (watch.status, tier.logs())
        step = watch.latest.params - base.params
        share = float((honest @ step - honest @ honest) / (-2 * honest @ honest))  # of the hostile delta in the step
        assert (watch.latest.version, share) == (base.version + 1, pytest.approx(0.2, abs=1e-4)), (share, watch.status)
        assert wait_until(lambda: (watch.status.get("bounded") or {}).get("repeat_agent") == 7, 30), watch.status
        records = read_audit(tier.audit)
        check_exactly_once(records, sent)
        assert {r["version"] for r in records} == {base.version}, "every update folded into the one buffer"
        assert watch.status["folded"] == len(SEQUENCE) and watch.status["fleet"] == FLEET, watch.status
