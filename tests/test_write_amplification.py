"""Issue 18, point 9: hostile traffic must not drive checkpoint writes (SD-card wear on a Pi).

Before: every group commit wrote a checkpoint, and a rejected payload made a commit due:
20,000 hostile payloads wrote 252 MB of checkpoints. Now a checkpoint is written only when
committed state changed; rejection counters ride with the next real commit or a timer
(`coordinator.session.COUNTERS_COMMIT_S`). The test floods a real coordinator with payloads
it refuses and reads what the process wrote (/proc/<pid>/io `wchar`, every byte it passed to
write(2): checkpoints, log lines and MQTT frames alike) and how many checkpoints it says it
wrote (status `checkpoints.written`).
"""

from __future__ import annotations

import os
import time

import numpy as np

from fleet import TopicWatcher, spawn, stop
from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from protocol.topics import Topics

T = Topics("wear")
WAIT = 60
HOSTILE = 1500


def written_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def status(watcher) -> dict:
    return watcher.json(T.coordinator_status) or {}


def test_hostile_payloads_add_at_most_one_checkpoint_per_second(mosquitto, tmp_path):
    ckpt = tmp_path / "ckpt"
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                        "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9", "--publish-interval", "0.2",
                        "--checkpoint-dir", ckpt, "--feature-stats", "--log-level", "WARNING",
                        log=tmp_path / "coordinator.log")
    try:
        watcher.wait_for(lambda: status(watcher), WAIT, "the coordinator's status")
        # one honest update: a real commit, so the checkpoint holds a model and a dedup entry
        enc = codec.encode(np.full(650, 0.01), "int8", np.random.default_rng(0))
        watcher.client.publish(T.update("honest"), encode_update(UpdateMessage("honest", 1, 0, 20, enc, {})),
                               qos=1).wait_for_publish(WAIT)
        watcher.wait_for(lambda: status(watcher).get("accepted") == 1, WAIT, "the honest update")
        size = (ckpt / "checkpoint.msgpack").stat().st_size
        before, started = written_bytes(coordinator.pid), time.monotonic()
        infos = []
        for i in range(HOSTILE):  # garbage updates, statistics of the wrong shape, a seq replayed
            topic, payload = ((T.update("evil"), b"\xc1 not msgpack"), (T.stats("evil"), b"\x80"),
                              (T.update("honest"), encode_update(UpdateMessage("honest", 1, 0, 20, enc, {}))))[i % 3]
            infos.append(watcher.client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(WAIT)

        def refused() -> int:
            s = status(watcher)
            return sum(s.get("rejected", {}).values()) + sum(s.get("statistics", {}).get("rejected", {}).values())
        final = watcher.wait_for(lambda: refused() >= HOSTILE and status(watcher), WAIT, "every hostile payload refused")
        took = time.monotonic() - started
        wrote = written_bytes(coordinator.pid) - before
        if os.environ.get("FEDMQ_PRINT_RSS"):
            print(f"\n{HOSTILE} hostile payloads in {took:.2f} s: {wrote / 1e6:.2f} MB written "
                  f"(checkpoint {size} B), status {final.get('checkpoints')}")
        assert final["accepted"] == 1 and final["version"] == 1, final
        # every checkpoint is at least `size` bytes; allow one per second and two more (start, the end)
        assert wrote < (took + 2) * size + 100_000, \
            f"{wrote / 1e6:.2f} MB written for {HOSTILE} refused payloads in {took:.1f} s ({size} B per checkpoint)"
        assert final["checkpoints"]["written"] <= 2 + took + 2, final["checkpoints"]
        assert final["checkpoints"]["deferred"] > 0, final["checkpoints"]
    finally:
        watcher.close()
        assert stop(coordinator) == 0
