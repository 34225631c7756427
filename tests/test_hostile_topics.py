"""Issue 18, point 8: one message on any topic the coordinator reads grows it <= 32 MB.

Before: a secure-aggregation key or share message raised the coordinator's peak by 606-611
MB and an agent status JSON by 226 MB: they were refused only after msgpack or json had built
them. Now every such message is bounded before it is decoded (its size for its kind, then the
msgpack structure walk of protocol.messages.scan), and paho's receive path keeps one copy of
a payload instead of three (protocol/mqtt_receive.py; with paho's own decoding the same 8 MiB
messages cost +24.3 to +31.3 MB). Each test starts the real coordinator on a real mosquitto,
sends the largest message the broker passes (8 MiB) on each topic, each followed by a garbage
update as a marker (one network thread: once the marker is counted, the message before it was
handled), and reads the peak RSS (VmHWM) before and after. Set FEDMQ_PRINT_RSS=1 to print the
figures. Seen red at this bound: with the status size check of coordinator/secagg.py lifted, the
8 MiB status JSON cost +60.2 MB.
"""

from __future__ import annotations

import msgpack
import pytest

import urllib.request

from fleet import TopicWatcher, spawn, stop
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import Topics
from simulation.mosquitto import free_port
from test_hostile_messages import empty_arrays, peak_rss_mb, publisher, report

T = Topics("topics")
TIMEOUT = 60
SIZE = MAX_MESSAGE_BYTES  # the broker's message size limit (broker/mosquitto.conf)
# Any 8 MiB message costs the receive path about 17 MB before the coordinator sees it (paho's
# packet buffer, grown as the socket delivers, and the payload's one copy), however it is
# handled next. Unbounded decoding cost 64-607 MB here; paho's three copies 24-31 MB.
BOUND_MB = 32


def json_of_small_numbers(size: int) -> bytes:
    """A JSON array of zeros, `size` bytes: millions of Python ints once parsed."""
    n = (size - 2) // 2
    return b"[" + b"0," * (n - 1) + b"0]"


def stats_with_a_huge_count(size: int) -> bytes:
    """A statistics map with a valid header whose count vector fills `size` bytes."""
    head = msgpack.packb({"format": 2, "type": "stats"}, use_bin_type=True)
    n = (size - len(head) - 16) // 8 * 8
    return b"\x83" + head[1:] + msgpack.packb("count") + b"\xc6" + n.to_bytes(4, "big") + b"\x00" * n


def secagg_map(kind: str, size: int) -> bytes:
    """A `kind` map whose one field is an array of empty arrays filling `size` bytes."""
    head = msgpack.packb({"type": kind, "round": b"r" * 16}, use_bin_type=True)
    return b"\x83" + head[1:] + msgpack.packb("to" if kind == "share" else "y") + empty_arrays(size - len(head) - 4)


SECAGG = ("--strategy", "fedbuff", "--buffer-size", 4, "--secure-aggregation")
STATS = ("--feature-stats",)
UPDATES = ("--no-feature-stats",)  # no agent sends statistics: without this the first model waits for them
# name: (the coordinator's flags, topic, payload, where the refusal is counted, the reason)
MESSAGES = {
    "key: an array of empty arrays": (SECAGG, T.secagg("key", "evil"), empty_arrays(SIZE), "secagg", "key"),
    "share: a map of empty arrays": (SECAGG, T.secagg("share", "evil"), secagg_map("share", SIZE), "secagg", "share"),
    "masked: a map of empty arrays": (SECAGG, T.secagg("masked", "evil"), secagg_map("masked", SIZE), "secagg", "masked"),
    "reveal: an array of empty arrays": (SECAGG, T.secagg("reveal", "evil"), empty_arrays(SIZE), "secagg", "reveal"),
    "agent status: JSON of zeros": (SECAGG, T.agent_status("evil"), json_of_small_numbers(SIZE), "secagg", "status_oversize"),
    "stats: an array of empty arrays": (STATS, T.stats("evil"), empty_arrays(SIZE), "statistics", "oversize"),
    "stats: a count of a million features": (STATS, T.stats("evil"), stats_with_a_huge_count(SIZE), "statistics", "oversize"),
    "schema: an array of empty arrays": (STATS, T.schema("evil"), empty_arrays(SIZE), "schema", "oversize"),
    "update: an array of empty arrays": (UPDATES, T.update("evil"), empty_arrays(SIZE), "rejected", "oversize"),
    "update chunk: an array of empty arrays": (UPDATES, T.update_chunk("evil"), empty_arrays(SIZE), "rejected", "chunk"),
}


def refusals(status: dict, where: str) -> dict:
    if where == "secagg":
        return status["secure_aggregation"]["refused"]
    if where == "rejected":  # updates: the marker is counted there too
        return {k: v for k, v in status["rejected"].items() if k != "decode"}
    return status[where]["rejected"]


@pytest.mark.parametrize("name", list(MESSAGES))
def test_one_message_grows_the_coordinator_at_most_32_mb(mosquitto, tmp_path, name):
    flags, topic, payload, where, reason = MESSAGES[name]
    if where == "secagg":
        pytest.importorskip("cryptography")
    assert len(payload) <= SIZE
    port = free_port()
    watcher = TopicWatcher(mosquitto.port, T.coordinator_status)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                        "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9", "--publish-interval", "0.2", *flags,
                        "--metrics-port", port, log=tmp_path / "coordinator.log")
    client = publisher(mosquitto)
    status = lambda: watcher.json(T.coordinator_status) or {}  # noqa: E731
    try:
        watcher.wait_for(status, TIMEOUT, "the coordinator's status")
        before = peak_rss_mb(coordinator.pid)
        client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)
        client.publish(T.update("marker"), b"\xc1", qos=1).wait_for_publish(TIMEOUT)
        final = watcher.wait_for(lambda: status().get("rejected", {}).get("decode") and status(), TIMEOUT,
                                 "the marker update refused")
        after = peak_rss_mb(coordinator.pid)
        report(f"coordinator, {len(payload) / 2**20:.1f} MiB {name}", before, after)
        assert coordinator.poll() is None, "the coordinator died"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        client.loop_stop()
        client.disconnect()
        watcher.close()
        assert stop(coordinator) == 0
    assert after - before <= BOUND_MB, f"peak RSS {before:.1f} -> {after:.1f} MB"
    assert refusals(final, where) == {reason: 1}, refusals(final, where)
    kind = "secure_aggregation" if where == "secagg" else where
    if where == "rejected":
        assert f'fedmq_updates_rejected_total{{fleet="{T.fleet}",reason="{reason}"}} 1.0' in metrics
    else:
        assert f'fedmq_messages_refused_total{{fleet="{T.fleet}",kind="{kind}",reason="{reason}"}} 1.0' in metrics
