"""A tier fleet of fewer agents than K steps as its agents send, not at the root's --buffer-timeout (issue 18 point 5:
K = min(K, agents online), on the tier from the agents in the partials the root folded, tier/heard.py).

A real nats-server, the root (fedbuff, K = 5, --buffer-timeout 60, --live-window 3) and a worker as processes, one
MQTT 3.1.1 client (paho) as two devices. Three rounds: both agents send an update on the newest model, and the next
version must come well within the buffer timeout, stepped on both agents (the audit: two agents a version). Seen red
with the root's resize a no-op (today's main: K stays 5): no version within 20 s, the first only at the timeout.
"""

from __future__ import annotations

import time

import numpy as np

from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.fleet import TOPICS, device_on_a_tier, read_audit, wait_folded, wait_until

AGENTS = ("small-0", "small-1")
ROUNDS = 3
TIMEOUT_S = 60.0  # the root's --buffer-timeout
STEP_S = 20.0  # a round's step must come this soon: a third of the timeout


def test_a_fleet_of_two_agents_with_k_5_steps_on_both_not_at_the_buffer_timeout(tmp_path, nats_node):
    root_args = ("--buffer-timeout", str(TIMEOUT_S), "--live-window", "3")
    with device_on_a_tier(nats_node, tmp_path, "small-fleet", root_args) as (tier, watch, devices, base):
        rng = np.random.default_rng(0)
        delta = np.full(base.spec.n_params, 0.01)
        sent = []
        for seq in range(1, ROUNDS + 1):
            version = watch.version
            for agent in AGENTS:
                update = UpdateMessage(agent, seq, version, 50, codec.encode(delta, "float32", rng))
                devices.publish(TOPICS.update(agent), encode_update(update), qos=1).wait_for_publish(10)
                sent.append((agent, seq))
            took = watch.wait_version_above(version, STEP_S)
            assert took is not None, (f"round {seq}: no step within {STEP_S} s", watch.status, tier.logs())
        records = wait_folded(tier.audit, sent, 10)
        by_version: dict[int, set] = {}
        for r in records:
            by_version.setdefault(r["version"], set()).add(r["agent"])
        assert sorted(by_version.values(), key=sorted) == [set(AGENTS)] * ROUNDS, by_version  # each step on both
        want = {"size": 5, "effective": 2, "heard_agents": 2, "window": 3.0}
        assert wait_until(lambda: watch.status.get("buffer") == want, 10), watch.status
        # both fall silent: once a --live-window passed without a partial of theirs, K is 1, and the retained status
        # says so without a model to carry it (seen red when only a model or a refusal sent the status: it kept 2)
        silent = {"size": 5, "effective": 1, "heard_agents": 0, "window": 3.0}
        version = watch.version
        assert wait_until(lambda: watch.status.get("buffer") == silent, 10), watch.status
        assert watch.version == version, "a version came from no update"


def test_a_flooding_agent_beside_four_honest_ones_never_shrinks_k_below_five(tmp_path, nats_node):
    """4 honest agents send about once a second, a hostile one ten times as often, for 8 s, with --live-window 3 (the
    warm-up over early): once all 5 were heard they stay heard, so every buffer the root stepped from then on holds 5
    agents, the hostile one's updates in it as one agent's (before, K was the agents heard so far). Seen red with the newest K updates kept instead of the newest K agents (buffers of 2 and
    3 agents: the flood pushed the honest ones out)."""
    root_args = ("--buffer-timeout", str(TIMEOUT_S), "--live-window", "3")
    with device_on_a_tier(nats_node, tmp_path, "flood", root_args) as (tier, watch, devices, base):
        rng = np.random.default_rng(0)
        delta = np.full(base.spec.n_params, 0.01)
        seqs: dict[str, int] = {}
        sent = []
        for tick in range(80):  # 8 s at 10 a second
            slot = (0, 3, 5, 8).index(tick % 10) if tick % 10 in (0, 3, 5, 8) else None  # each honest one once a second
            for agent in ["evil-1"] + ([f"honest-{slot}"] if slot is not None else []):
                seqs[agent] = seqs.get(agent, 0) + 1
                update = UpdateMessage(agent, seqs[agent], watch.version, 50, codec.encode(delta, "float32", rng))
                devices.publish(TOPICS.update(agent), encode_update(update), qos=1).wait_for_publish(10)
                sent.append((agent, seqs[agent]))
            time.sleep(0.1)  # pacing the devices' sends, not synchronisation
        records = wait_folded(tier.audit, sent, 30)
        assert {(r["agent"], r["seq"]) for r in records} >= set(sent), tier.logs()
        all_heard = max(min(r["t"] for r in records if r["agent"] == agent) for agent in seqs)  # the fifth's first
        by_version: dict[int, set] = {}
        for r in records:
            by_version.setdefault(r["version"], set()).add(r["agent"])
        last = {v: max(r["t"] for r in records if r["version"] == v) for v in by_version}
        stepped = {v: agents for v, agents in by_version.items()  # before all were heard K was what had been
                   if last[v] >= all_heard and v < max(by_version)}  # the newest buffer is still open
        assert len(stepped) >= 4 and all(len(agents) == 5 for agents in stepped.values()), by_version
        assert watch.status.get("buffer", {}).get("heard_agents") == 5, watch.status
