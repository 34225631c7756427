"""Issue 20: chunked updates through the tier's partition workers.

A real agent whose update (a 3,001-parameter model, int8) is larger than its `--max-packet-bytes`
publishes it as chunks on update/<id>/chunk; the cluster maps them to updc/<partition>/<id>; the
worker owning that partition assembles them with the coordinator's chunk module and folds the
update, which reaches the root's audit log. Malformed and oversize chunks on another agent's chunk
topic are dropped and counted in the worker's log, and nothing else of the fleet stops."""

from __future__ import annotations

import hashlib
import json
import re
import time

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet import spawn
from protocol import chunking
from protocol.tabular import write_csv
from protocol.topics import Topics

FLEET = "chunkf"
TOPICS = Topics(FLEET)
FEATURES = 3000
PACKET = 1024  # the agent's --max-packet-bytes: its ~3 KB update goes as 4 chunks


def _audit(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)  # polling files other processes write
    return False


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
