"""Issue 20, the sustained rate: a partition worker handed a burst beyond its fold rate folds it at its own
pace; NATS does not cut its session as a slow consumer.

Real processes on a real nats-server (tier/cluster.py's shipped config): a root and a worker on one
partition, the worker killed -9, then a burst of 1,500 updates of 50,000 int8 parameters (75 MB) from
tier/loadgen.py stored for its partition's session while no one reads it, then a new worker taking the
partition over: NATS pushes the session's whole window at once. With the window at 4,096 messages (before)
that is 200 MB queued for one connection, past the server's 64 MiB max_pending: the session was cut on
every reconnect (seen red). Every sent (agent, seq) must be in the root's audit log exactly once."""

from __future__ import annotations

import asyncio

from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from tier.cluster import NatsCluster
from tier.loadgen import open_many, send
from tier.fleet import START_S, TOPICS, Tier, check_exactly_once, wait_folded

import numpy as np

N_PARAMS = 50_000  # 50 KB a message at int8
AGENTS = 50
PER_AGENT = 30


def test_a_backlog_beyond_the_fold_rate_is_folded_without_the_session_being_cut(tmp_path):
    rng = np.random.default_rng(0)
    delta = codec.encode(rng.normal(size=N_PARAMS) * 0.01, "int8", rng)
    sent = [(f"b{a}", s) for s in range(1, PER_AGENT + 1) for a in range(AGENTS)]
    messages = [(TOPICS.update(agent), encode_update(UpdateMessage(agent, seq, 0, 10, delta))) for agent, seq in sent]
    with NatsCluster(tmp_path / "nats", nodes_count=1, partitions=1) as cluster:
        tier = Tier(cluster, tmp_path, partitions=1, buffer_size=50,
                    spec_args=("--model", "sgd-regressor", "--n-features", N_PARAMS - 1))
        try:
            tier.start_root()
            first = tier.start_worker()
            for name in [*tier.roots, first]:
                assert tier.wait_up(name, START_S), f"{name} never came up\n" + tier.logs()
            assert _wait_log(tmp_path / f"{first}.log", "partition 0: epoch", START_S), tier.logs()
            tier.kill(first)  # the session stays (persistent): NATS keeps its QoS 1 messages

            async def burst():
                conns = await open_many(10, [cluster.nodes[0].mqtt_port], "burst")
                times = await send(conns, messages, window=64)
                for c in conns:
                    await c.close()
                return times

            times = asyncio.run(asyncio.wait_for(burst(), 300))
            assert all(acked for _, acked in times), "NATS did not store every update of the burst"
            tier.start_worker()  # takes the partition over: the backlog comes at once
            records = wait_folded(tier.audit, sent, 240)
            log = cluster.nodes[0].log.read_text(errors="replace")
            assert "Server is ready" in log, f"not the node's log: {cluster.nodes[0].log}"
            cuts = [line for line in log.splitlines() if "Slow Consumer" in line]
            assert not cuts, f"NATS cut {len(cuts)} connection(s) as slow consumers, e.g. {cuts[0]}"
            check_exactly_once([r for r in records if r["agent"].startswith("b")], sent)
        finally:
            tier.stop()


def _wait_log(path, mark: str, timeout: float) -> bool:
    from tier.fleet import wait_until

    return wait_until(lambda: path.exists() and mark in path.read_text(errors="replace"), timeout)
