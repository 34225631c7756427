"""A tier of real processes for tests and benchmarks: a NATS cluster's roots and workers as processes of this
checkout, a publisher of pre-encoded updates that fails over between nodes, the audit-log checks of exactly-once,
and the kill -9 scenario (tests/test_tier_kill.py asserts on it, bench/scale_out.py --only kills times it).
Here, not in tests/, so the benchmark runs it without importing the test suite."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import codec
from protocol.messages import UpdateMessage, decode_model, encode_update
from protocol.topics import Topics
from tier.cluster import NatsCluster
from tier.mqtt_link import Link, parse_urls

ROOT = Path(__file__).resolve().parent.parent


def spawn(module: str, *args, log: Path) -> subprocess.Popen:
    """Start `python -m module args...` of this checkout with its output appended to `log` (tests/fleet.py's,
    bench/scale_out.py's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


FLEET = "tierf"
TOPICS = Topics(FLEET)
N_FEATURES = 9


def regression_shard(path: Path, rows: int = 60) -> Path:
    """A real agent's data for the fleet's sgd-regressor: `rows` of N_FEATURES, y = 2 x0 + 0.5, at `path`."""
    from protocol.tabular import write_csv

    X = np.random.default_rng(0).normal(size=(rows, N_FEATURES))
    write_csv(path, X, X[:, 0] * 2.0 + 0.5)
    return path


class Tier:
    """Roots and workers of one fleet on `cluster`, each a process with its own log."""

    def __init__(self, cluster: NatsCluster, workdir: Path, *, partitions: int, buffer_size: int = 5,
                 root_args: tuple = (), spec_args: tuple = ("--model", "sgd-regressor", "--n-features", N_FEATURES)) -> None:
        self.cluster = cluster
        self.root_args = root_args
        self.spec_args = spec_args
        self.workdir = Path(workdir)
        self.partitions = partitions
        self.buffer_size = buffer_size
        self.audit = self.workdir / "audit.jsonl"
        self.roots: dict[str, object] = {}
        self.workers: dict[str, object] = {}
        self._n = 0

    def _common(self) -> list[str]:
        c = self.cluster
        return ["--nats", ",".join(c.nats_urls), "--mqtt", ",".join(c.mqtt_urls), "--fleet", FLEET,
                "--replicas", str(c.replicas)]

    def start_root(self) -> str:
        self._n += 1
        rid = f"root{self._n}"
        self.roots[rid] = spawn("tier.root", *self._common(), *self.spec_args, "--partitions", self.partitions,
                                "--buffer-size", self.buffer_size, "--buffer-timeout", "1", "--audit-log", self.audit,
                                "--id", rid, *self.root_args, log=self.workdir / f"{rid}.log")
        return rid

    def start_worker(self) -> str:
        self._n += 1
        wid = f"worker{self._n}"
        self.workers[wid] = spawn("tier.worker", *self._common(), "--partitions", self.partitions, "--id", wid,
                                  log=self.workdir / f"{wid}.log")
        return wid

    def wait_up(self, name: str, timeout: float) -> bool:
        """Until process `name` is serving (a worker holds its presence lease, a root's MQTT link is up):
        a kill must not come while the replacement of the previous one is still importing (40 s at load 60)."""
        mark = f"won lease w_{name}" if name in self.workers else f"fedmq-root-{FLEET}-{name} connected"
        log = self.workdir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and mark in log.read_text(errors="replace"):
                return True
            time.sleep(0.2)  # polling a log file: there is no event to wait on
        return False

    def kill(self, name: str) -> None:
        """kill -9, no chance to save anything."""
        proc = self.roots.pop(name, None) or self.workers.pop(name)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in [*self.roots.values(), *self.workers.values()]:
            proc.kill()
            proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.workdir.glob("*.log")))


class ModelWatch:
    """Every model version the fleet receives, with its time: one subscriber pinned to each node (no failover).

    A subscriber on a surviving node sees the tier's model advance as soon as the tier publishes it; one on
    a killed node is offline until the node is back (a device there reconnects elsewhere, after the
    elections of the streams that node led: `reconnects` of the devices' links measure that)."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.versions: list[list[tuple[float, int]]] = []  # per subscriber, in order of arrival
        self.status: dict = {}
        self.latest = None  # the newest model message received
        self.lock = threading.Lock()
        self.links = []
        for i, node in enumerate(parse_urls(cluster.mqtt_urls)):
            self.versions.append([])
            link = Link([node], f"test-model-watch-{i}", persistent=False,
                        on_message=lambda c, u, m, i=i: self._on_message(i, m),
                        on_connect=lambda c, *a: c.subscribe([(TOPICS.model, 1), (TOPICS.coordinator_status, 1)]))
            link.start()
            self.links.append(link)

    def _on_message(self, i: int, msg) -> None:
        if msg.topic == TOPICS.coordinator_status:
            self.status = json.loads(msg.payload)
            return
        model = decode_model(msg.payload)
        with self.lock:
            self.versions[i].append((time.monotonic(), model.version))
            if self.latest is None or model.version > self.latest.version:
                self.latest = model

    @property
    def version(self) -> int:
        """The newest version any subscriber received (a stale retained copy delivered later does not lower it)."""
        with self.lock:
            return max((v for seen in self.versions for _, v in seen), default=-1)

    def wait_version_above(self, version: int, timeout: float) -> float | None:
        """Seconds until a version above `version` arrived at any subscriber, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.version > version:
                return time.monotonic() - start
            time.sleep(0.05)  # polling a counter a paho thread sets
        return None

    def close(self) -> None:
        for link in self.links:
            link.close()


class Publisher:
    """Devices: `agents` ids publishing pre-encoded QoS 1 updates at `rate`/s over failover connections.

    An update without a PUBACK after `resend_s` is published again (a device's resend-after):
    duplicates are the tier's to absorb. `sent` is every (agent, seq) made."""

    def __init__(self, cluster: NatsCluster, watch: ModelWatch, *, agents: int = 24, rate: float = 40.0,
                 resend_s: float = 6.0, connections: int = 3) -> None:
        self.watch = watch
        self.agents = agents
        self.rate = rate
        self.resend_s = resend_s
        rng = np.random.default_rng(0)
        self.delta = codec.encode(rng.normal(size=N_FEATURES + 1) * 0.01, "int8", rng)
        nodes = parse_urls(cluster.mqtt_urls)
        self.links = [Link(nodes, f"test-dev-{i}", persistent=False, start=i) for i in range(connections)]
        for link in self.links:
            link.start()
        self.sent: list[tuple[str, int]] = []
        self.outstanding: dict[tuple[str, int], tuple[float, bytes, object]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        assert all(link.wait(30) for link in self.links), "devices cannot connect to the cluster"
        self.thread.start()

    def _publish(self, key, payload) -> None:
        link = self.links[hash(key[0]) % len(self.links)]
        try:
            info = link.client.publish(TOPICS.update(key[0]), payload, qos=1)
        except (RuntimeError, ValueError):
            info = None
        self.outstanding[key] = (time.monotonic(), payload, info)

    def _run(self) -> None:
        seqs = collections.Counter()
        i = 0
        start = time.monotonic()
        while not self.stopping.is_set():
            agent = f"dev{i % self.agents}"
            seqs[agent] += 1
            key = (agent, seqs[agent])
            payload = encode_update(UpdateMessage(agent, seqs[agent], max(self.watch.version, 0), 10, self.delta))
            self.sent.append(key)
            self._publish(key, payload)
            self._resend()
            i += 1
            self.stopping.wait(max(0.0, start + i / self.rate - time.monotonic()))

    def _resend(self) -> None:
        now = time.monotonic()
        for key, (at, payload, info) in list(self.outstanding.items()):
            if _acked(info):
                del self.outstanding[key]
            elif now - at > self.resend_s:
                self._publish(key, payload)

    def stop_and_drain(self, timeout: float) -> bool:
        """Stop making updates; True once every one was acknowledged by the broker."""
        self.stopping.set()
        self.thread.join(10)
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline:
            self._resend()
            time.sleep(0.1)
        return not self.outstanding

    def close(self) -> None:
        """Stop making updates and close the links."""
        self.stopping.set()
        for link in self.links:
            link.close()


def _acked(info) -> bool:
    try:
        return info is not None and info.is_published()
    except (RuntimeError, ValueError):  # "not currently connected": not acknowledged, resent later
        return False



def device_client(client_id: str, user: str | None = None, password: str | None = None) -> tuple[mqtt.Client, threading.Event]:
    """An MQTT 3.1.1 client as a device (with `user`, e.g. the tier's) is, not yet connected; the event follows
    its connection."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.on_connect = lambda *a: connected.set()
    client.on_disconnect = lambda *a: connected.clear()
    if user is not None:
        client.username_pw_set(user, password)
    return client, connected

def online(client: mqtt.Client, connected: threading.Event, node) -> None:
    """Connect `client` (a device_client) to `node`'s MQTT listener and wait, bounded, for its CONNACK."""
    client.connect("127.0.0.1", node.mqtt_port, 30)
    client.loop_start()
    if not connected.wait(30):
        raise AssertionError(f"no CONNACK from the MQTT listener on port {node.mqtt_port} within 30 s")


@contextlib.contextmanager
def device_on_a_tier(cluster: NatsCluster, workdir: Path, client_id: str, root_args: tuple = (), **tier_args
                     ) -> Iterator[tuple[Tier, ModelWatch, mqtt.Client, object]]:
    """A root and a worker on `cluster` (`tier_args` for the Tier, e.g. buffer_size), their first model received,
    and a device_client of the shared device user (it may publish as any agent) online: (tier, watch, client, first
    model); all of them stopped on exit."""
    tier = Tier(cluster, workdir, partitions=cluster.partitions, root_args=root_args, **tier_args)
    watch = ModelWatch(cluster)
    client, connected = device_client(client_id)
    try:
        tier.start_root()
        tier.start_worker()
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        base = watch.latest
        online(client, connected, cluster.nodes[0])
        yield tier, watch, client, base
    finally:
        client.loop_stop()
        client.disconnect()
        watch.close()
        tier.stop()


def wait_until(cond, timeout: float) -> bool:
    """True once cond() is (polled: what other processes write or paho threads set), False at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)  # polling: there is no event to wait on
    return False


def read_audit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_folded(path: Path, sent: list, timeout: float) -> list[dict]:
    """The audit records once every sent (agent, seq) is in them (or at the timeout)."""
    want = set(sent)
    deadline = time.monotonic() + timeout
    while True:
        records = read_audit(path)
        if want <= {(r["agent"], r["seq"]) for r in records} or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def check_exactly_once(records: list[dict], sent: list) -> None:
    assert records, "the audit log is empty: nothing to check against"
    counted = collections.Counter((r["agent"], r["seq"]) for r in records)
    lost = set(sent) - set(counted)
    twice = {k: v for k, v in counted.items() if v > 1}
    extra = set(counted) - set(sent)
    assert not lost, f"{len(lost)} update(s) lost, e.g. {sorted(lost)[:5]}"
    assert not twice, f"{len(twice)} update(s) counted more than once, e.g. {sorted(twice.items())[:5]}"
    assert not extra, f"audit names updates nobody sent: {sorted(extra)[:5]}"


def check_one_owner_at_a_time(records: list[dict]) -> None:
    """Per partition, the folded partials' epochs never go back as their seq goes up: no two owners interleave."""
    by_partition = collections.defaultdict(dict)
    for r in records:
        by_partition[r["partition"]][r["pseq"]] = r["epoch"]
    for partition, epochs in by_partition.items():
        ordered = [epochs[s] for s in sorted(epochs)]
        assert ordered == sorted(ordered), f"partition {partition}: owners interleave: {ordered}"
        assert sorted(epochs) == list(range(1, len(epochs) + 1)), f"partition {partition}: partial seq gap"


def check_monotone(records: list[dict], watch: ModelWatch, timeout: float = 10.0) -> int:
    """The root's versions, in commit order across every failover, never go back, and the fleet receives the
    version the last update was folded at (waited for, bounded: the root writes the audit before it commits
    and publishes, and the model then still crosses NATS to the watch); returns how many stale retained
    copies the subscribers were handed (a node catching up may deliver an older retained model to a
    reconnecting subscriber: agents ignore a model older than theirs)."""
    versions = [r["version"] for r in records]
    assert versions, "no version in the audit log"
    assert all(b >= a for a, b in zip(versions, versions[1:])), f"a version went backwards: {versions}"
    assert watch.wait_version_above(versions[-1] - 1, timeout) is not None, \
        f"the fleet never received version {versions[-1]}, the last update's (newest seen: {watch.version})"
    return sum(1 for seen in watch.versions for (_, a), (_, b) in zip(seen, seen[1:]) if b < a)


# the bound for every kind of kill. A node's death costs the Raft elections of what it led, 4-9 s after
# its last heartbeat (not configurable in nats-server 2.15); what came on top of them is cut to a fraction of a
# second (docs/architecture.md, "Recovery")
RECOVERY_S = 10.0
START_S = 120.0  # processes importing scikit-learn on a machine at load 40 took 40 s to log a line (seen)
VICTIMS = ("worker", "root", "nats")


class KillRun:
    """Two roots (one active, one standby) and two partition workers on `cluster`, devices publishing
    through its MQTT listeners, the model advancing: `kill` takes one of `VICTIMS` down with kill -9 at
    a random moment and times the model advancing again."""

    def __init__(self, cluster: NatsCluster, tier: Tier, watch: ModelWatch, publisher: Publisher,
                 rng: random.Random) -> None:
        self.cluster, self.tier, self.watch, self.publisher, self.rng = cluster, tier, watch, publisher, rng
        self.recoveries: list[float] = []

    def _active_root(self) -> str:
        name = self.watch.status.get("root")
        assert name in self.tier.roots, f"status names root {name!r}, running: {list(self.tier.roots)}"
        return name

    def kill(self, victim: str) -> float:
        """kill -9 of a worker, the active root or a NATS node 1-4 s from now; the seconds until the model
        advanced again (measured up to 3x RECOVERY_S, judged by the caller); then the victim's replacement
        (a worker, a standby root, the node itself) is up, so the next kill finds the tier whole."""
        tier = self.tier
        self.publisher.stopping.wait(self.rng.uniform(1.0, 4.0))  # a random moment of the run
        if victim == "worker":
            tier.kill(self.rng.choice(sorted(tier.workers)))
        elif victim == "root":
            tier.kill(self._active_root())
        else:
            node = self.rng.randrange(3)
            self.cluster.kill(node)
            logging.getLogger("tier.mqtt_link").info("KILLED node %d", node)
        at = self.watch.version
        took = self.watch.wait_version_above(at, 3 * RECOVERY_S)
        assert took is not None, f"{victim} kill: the model stayed at version {at}\n" + tier.logs()
        self.recoveries.append(round(took, 2))
        if victim == "nats":
            self.cluster.restart(node)
            return self.recoveries[-1]
        started = tier.start_worker() if victim == "worker" else tier.start_root()  # capacity back / a new standby
        assert tier.wait_up(started, START_S), f"{started} never came up\n" + tier.logs()
        return self.recoveries[-1]

    def verify(self) -> dict:
        """Stop the devices, then every sent (agent, seq) folded exactly once, one owner per partition at a
        time, versions monotone (asserted); what was checked: updates sent, stale retained copies seen."""
        assert self.publisher.stop_and_drain(30), f"{len(self.publisher.outstanding)} update(s) never acknowledged"
        records = wait_folded(self.tier.audit, self.publisher.sent, 45)
        check_exactly_once(records, self.publisher.sent)
        check_one_owner_at_a_time(records)
        stale = check_monotone(records, self.watch)
        return {"updates": len(self.publisher.sent), "lost": 0, "counted_twice": 0, "stale_copies": stale}


@contextlib.contextmanager
def kill_run(cluster: NatsCluster, workdir: Path, rng: random.Random) -> Iterator[KillRun]:
    """The tier of `KillRun` up on `cluster` (processes' logs in `workdir`), the model advanced once under the
    devices' updates; every process and connection it made is gone on exit."""
    tier = Tier(cluster, workdir, partitions=cluster.partitions)
    handler = logging.FileHandler(Path(workdir) / "test-links.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    links = logging.getLogger("tier.mqtt_link")
    links.addHandler(handler)
    links.setLevel(logging.INFO)
    watch = ModelWatch(cluster)
    publisher = None
    try:
        for _ in range(2):
            tier.start_root()
            tier.start_worker()
        for name in [*tier.roots, *tier.workers]:
            assert tier.wait_up(name, START_S), f"{name} never came up\n" + tier.logs()
        assert watch.wait_version_above(-1, START_S) is not None, "no retained model from the root\n" + tier.logs()
        publisher = Publisher(cluster, watch)
        publisher.start()
        assert watch.wait_version_above(0, START_S) is not None, "the model never advanced\n" + tier.logs()
        yield KillRun(cluster, tier, watch, publisher, rng)
    finally:
        if publisher is not None:
            publisher.close()
        watch.close()
        tier.stop()
        links.removeHandler(handler)
        handler.close()
