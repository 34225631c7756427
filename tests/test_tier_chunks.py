"""Issue 20: chunked updates through the tier's partition workers.

A real agent whose update (a 3,001-parameter model, int8) is larger than its `--max-packet-bytes`
publishes it as chunks on update/<id>/chunk; the cluster maps them to updc/<partition>/<id>; the
worker owning that partition assembles them with the coordinator's chunk module and folds the
update, which reaches the root's audit log. Malformed and oversize chunks on another agent's chunk
topic are dropped and counted in the worker's log, and nothing else of the fleet stops."""

from __future__ import annotations

import hashlib
import re

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import spawn
from protocol import chunking
from protocol.tabular import write_csv
from protocol.topics import Topics
from tier_fleet import read_audit, wait_until

FLEET = "chunkf"
TOPICS = Topics(FLEET)
FEATURES = 3000
PACKET = 1024  # the agent's --max-packet-bytes: its ~3 KB update goes as 4 chunks


_audit, _wait = read_audit, wait_until


def test_a_chunked_update_goes_through_a_worker_and_bad_chunks_are_counted(tmp_path, nats_node):
    cluster = nats_node
    common = ["--nats", ",".join(cluster.nats_urls), "--mqtt", ",".join(cluster.mqtt_urls), "--fleet", FLEET,
              "--partitions", cluster.partitions, "--replicas", 1]
    audit = tmp_path / "audit.jsonl"
    root = spawn("tier.root", *common, "--model", "sgd-regressor", "--n-features", FEATURES, "--buffer-size", 1,
                 "--buffer-timeout", 1, "--audit-log", audit, "--id", "root1", log=tmp_path / "root.log")
    worker = spawn("tier.worker", *common, "--id", "w1", log=tmp_path / "worker.log")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, FEATURES))
    write_csv(tmp_path / "dev.csv", X, X[:, 0] * 2.0)
    agent = spawn("edge_agent", "--broker", cluster.mqtt_urls[0], "--fleet", FLEET, "--id", "big-1", "--data",
                  tmp_path / "dev.csv", "--codec", "int8", "--max-packet-bytes", PACKET, "--train-every", "1",
                  "--log-level", "DEBUG", log=tmp_path / "agent.log")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-bad-chunks", protocol=mqtt.MQTTv311)
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"  # noqa: E731
                             for p in sorted(tmp_path.glob("*.log")))
    try:
        assert _wait(lambda: len({r["seq"] for r in _audit(audit) if r["agent"] == "big-1"}) >= 2, 150), logs()
        # it really went as chunks: the agent's updates do not fit its packet limit
        sizes = [int(b) for b in re.findall(r"sent update: version \d+, seq \d+, (\d+) bytes",
                                            (tmp_path / "agent.log").read_text())]
        assert sizes and min(sizes) > 2 * PACKET, sizes  # 3 chunks or more
        sender.connect("127.0.0.1", cluster.nodes[0].mqtt_port, 30)
        sender.loop_start()
        bad = TOPICS.update_chunk("bad-1")
        oversize = msgpack.packb([chunking.FORMAT_VERSION, "chunk", hashlib.sha256(b"x").digest(), 0,
                                  chunking.MAX_CHUNKS, b"x" * 2048], use_bin_type=True)
        for payload in (b"not a chunk", oversize):
            sender.publish(bad, payload, qos=1).wait_for_publish(10)
        worker_log = tmp_path / "worker.log"
        assert _wait(lambda: "as chunk " in worker_log.read_text() and "as chunk_oversize" in worker_log.read_text(),
                     30), logs()
        # and the fleet carries on: the agent's next update is folded after the bad chunks
        folded = len(_audit(audit))
        assert _wait(lambda: len(_audit(audit)) > folded, 60), logs()
        assert all(r["agent"] == "big-1" for r in _audit(audit))
    finally:
        sender.loop_stop()
        for proc in (agent, worker, root):
            proc.kill()
            proc.wait(10)


def test_a_partition_holds_every_chunk_ack_until_the_update_is_folded_and_releases_bad_ones():
    """The worker's side without a broker: a chunk's ack reaches the partition's unacknowledged list (acked
    only by the commit after the partial is stored) with its assembled update, never before; a malformed
    chunk of another agent is released at once and counted. Seen red with the acks released per chunk."""
    from types import SimpleNamespace

    from coordinator.staleness import Constant
    from edge_agent.chunks import update_packets
    from protocol import codec
    from protocol.messages import ModelMessage, UpdateMessage, encode_update
    from protocol.model_spec import ModelSpec
    from tier.worker import Partition

    spec = ModelSpec("sgd-regressor", FEATURES, ())
    worker = SimpleNamespace(topics=TOPICS, model=ModelMessage(FLEET, 0, spec, np.zeros(spec.n_params)),
                             staleness=Constant(), max_staleness=10, max_norm=1e6, norm_factor=None, dp=None, secagg=None, nats=None,
                             worker_id="w", max_held_chunks=64, chunk_timeout=60.0)
    part = Partition(worker, 0, SimpleNamespace(epoch=1))
    part.adopt(worker.model)
    part.link = SimpleNamespace(connection=1)
    delta = codec.encode(np.full(spec.n_params, 0.01), "int8", np.random.default_rng(0))
    packets = update_packets(TOPICS, "big-1", encode_update(UpdateMessage("big-1", 1, 0, 10, delta)), PACKET)
    assert len(packets) >= 3 and all(t == TOPICS.update_chunk("big-1") for t, _ in packets)
    message = lambda agent, mid, payload: SimpleNamespace(topic=f"fedmq/{FLEET}/updc/0/{agent}",  # noqa: E731
                                                          payload=payload, retain=False, mid=mid, qos=1)
    for mid, (_, payload) in enumerate(packets[:-1], 1):
        part._on_message(None, None, message("big-1", mid, payload))
        assert part.unacked == [] and part.covers == []  # held with the partial set
    part._on_message(None, None, message("bad-1", 99, b"not a chunk"))
    assert part.unacked == [(1, 99, 1)] and part.core.rejected_["chunk"] == 1
    part._on_message(None, None, message("big-1", len(packets), packets[-1][1]))
    assert sorted(part.unacked) == [(1, m, 1) for m in range(1, len(packets) + 1)] + [(1, 99, 1)]
    assert part.covers == [("big-1", 1, 0)] and part.strategy.count == 1  # folded: in the next partial
